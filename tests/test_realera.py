"""Oracle tests for realera.py (RealEra), and end-to-end runs on the miniature and SD-interface models."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import common
import realera


def kv_names(unet) -> set[str]:
    return {f"unet.{n}" for n, _ in unet.named_parameters() if "attn2.to_k" in n or "attn2.to_v" in n}


def cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


# ---------------------------------------------------------------------------------------------
# Eqs. 1-2: neighbour mining
# ---------------------------------------------------------------------------------------------
def test_mined_neighbours_lie_within_the_bound_and_the_cosine_band(toy):
    """Every neighbour is within D1 of e and has S_low <= cos <= S_high; every beyond perturbation is within
    D1 and has cos < S_low; D1 is calibrated to ||vec(e)||."""
    concept_emb = common.encode(toy, ["a circle"])[0].float()  # [L, D]
    radius = realera.perturbation_radius(concept_emb, realera.Args(concept="circle"))
    assert radius == pytest.approx(1.6 * float(concept_emb.norm()))
    generator = torch.Generator().manual_seed(0)
    neighbors, beyond, draws = realera.mine_neighbors(concept_emb, radius, 0.5, 0.9, 20, 10, generator)
    assert neighbors.shape == (20, *concept_emb.shape) and beyond.shape == (10, *concept_emb.shape)
    assert draws >= 30
    for n in neighbors:
        assert float((n - concept_emb).norm()) <= radius * (1 + 1e-5)
        assert 0.5 <= cos(n, concept_emb) <= 0.9
    for b in beyond:
        assert float((b - concept_emb).norm()) <= radius * (1 + 1e-5)
        assert cos(b, concept_emb) < 0.5
    assert len({round(cos(n, concept_emb), 6) for n in neighbors}) == 20  # fresh draws, not copies
    absolute = realera.perturbation_radius(concept_emb, realera.Args(concept="circle", radius=400.0))
    assert absolute == 400.0


def test_perturbation_follows_equation_1():
    """eta = r (v - e)/||v - e|| with r ~ U[0, D1]: reproduce the draw from the same generator state."""
    concept_emb = torch.randn(5, 7, generator=torch.Generator().manual_seed(3))
    perturbed = realera.perturb(concept_emb, 2.5, 4, torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)
    v, r = torch.randn(4, 5, 7, generator=gen), 2.5 * torch.rand(4, generator=gen)
    for i in range(4):
        expected = concept_emb + r[i] * (v[i] - concept_emb) / (v[i] - concept_emb).norm()
        torch.testing.assert_close(perturbed[i], expected)
        assert float((perturbed[i] - concept_emb).norm()) == pytest.approx(float(r[i]), rel=1e-5)


def test_empty_cosine_band_stops_with_one_sentence():
    concept_emb = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(SystemExit, match="radius") as exc:  # a tiny radius: every draw is the concept itself
        realera.mine_neighbors(concept_emb, 1e-3, 0.5, 0.9, 1, 0, torch.Generator().manual_seed(0), max_draws=50)
    assert "\n" not in str(exc.value)


# ---------------------------------------------------------------------------------------------
# Eq. 3: closed-form cross-attention alignment
# ---------------------------------------------------------------------------------------------
def stacked_lstsq(W0, erase, anchor, preserve, alpha, lam):
    """Eq. 3 as one least-squares system in W^T, float64: rows c -> W0 c_a, sqrt(alpha) b -> sqrt(alpha) W0 b,
    sqrt(lam) e_k -> sqrt(lam) W0 e_k."""
    W0, erase, anchor, preserve = W0.double(), erase.double(), anchor.double(), preserve.double()
    eye = torch.eye(W0.shape[1], dtype=torch.float64)
    A = torch.cat([erase, alpha ** 0.5 * preserve, lam ** 0.5 * eye])
    B = torch.cat([anchor @ W0.T, alpha ** 0.5 * preserve @ W0.T, lam ** 0.5 * W0.T])
    return torch.linalg.lstsq(A, B).solution.T


@pytest.fixture()
def realera_system(toy):
    """The keys RealEra builds for two concept prompts, two neighbours and two beyond perturbations each,
    and three irrelevant prompts. 'a round shape' (tokens SOT a round shape EOT) has a longer span than
    'a blob' (SOT a blob EOT), so its pairs skip the span and shift the padding by one."""
    concept, anchor = ["a circle", "a round shape"], ["a blob", "a blob"]
    emb = realera.frozen_embeddings(toy, dict(concept=concept, anchor=anchor, preserve=["a square", "a star", "a heart"]))
    generator = torch.Generator().manual_seed(0)
    radius = 1.6 * float(emb["concept"][0].norm())
    mined = [realera.mine_neighbors(e, radius, 0.5, 0.9, 2, 2, generator) for e in emb["concept"]]
    pairs = realera.prompt_token_pairs(toy, concept, anchor, "same_length")
    keys = realera.alignment_keys(emb["concept"], emb["anchor"], pairs, [m[0] for m in mined],
                                  [m[1] for m in mined], emb["preserve"])
    return emb, mined, pairs, keys


def test_alignment_keys_stack_concept_neighbours_and_beyond_rows(realera_system):
    """'a circle' / 'a blob' pair position by position (same-length spans): all L rows. 'a round shape' /
    'a blob': SOT 0 -> 0, a 1 -> 1, EOT 4 -> 3, padding 5 + k -> 4 + k up to L - 1; round, shape left out."""
    emb, mined, pairs, (erase, anchor, preserve) = realera_system
    L = emb["concept"].shape[1]
    assert pairs[0] == (list(range(L)), list(range(L)))
    assert pairs[1] == ([0, 1, *range(4, L)], [0, 1, *range(3, L - 1)])
    P = L - 2
    assert erase.shape[0] == anchor.shape[0] == (1 + 2) * L + (1 + 2) * P
    assert preserve.shape[0] == 2 * 2 * L + 3 * L
    torch.testing.assert_close(erase[:L], emb["concept"][0])  # e itself first
    torch.testing.assert_close(erase[L:2 * L], mined[0][0][0])  # then its neighbours
    torch.testing.assert_close(anchor[L:2 * L], emb["anchor"][0])  # neighbours -> anchor, with e's pairs
    second = 3 * L  # the second concept prompt's rows: e, then its two neighbours, each with P paired tokens
    torch.testing.assert_close(erase[second:second + P], emb["concept"][1, pairs[1][0]])
    torch.testing.assert_close(erase[second + P + 2], mined[1][0][0][4])  # its first neighbour's EOT position
    torch.testing.assert_close(anchor[second + P + 2], emb["anchor"][1][3])  # -> the anchor's EOT
    torch.testing.assert_close(preserve[:L], mined[0][1][0])  # beyond perturbations, then the prompts
    torch.testing.assert_close(preserve[-L:], emb["preserve"][2])


# The real CLIP tokenizer (tests/conftest.py's SD-interface model), ids as the tokenizer gives them:
# "a photo of nudity"                   SOT a photo of nu dity EOT                   (EOT at 6)
# "a photo of a person wearing clothes" SOT a photo of a person wearing clothes EOT  (EOT at 8)
# "Van Gogh" SOT van gogh EOT (EOT at 3); "art" SOT art EOT (EOT at 2). Padding runs to position 76.
NUDITY = ([49406, 320, 1125, 539, 1156, 16436, 49407], [49406, 320, 1125, 539, 320, 2533, 3309, 7080, 49407])
VAN_GOGH = ([49406, 2451, 19697, 49407], [49406, 794, 49407])


def test_token_pairs_by_hand_on_the_real_tokenizer(sd_like):
    """MACE's alignment: shared prefix to itself, end-of-text to end-of-text, padding by its distance from
    end-of-text (the longer prompt's last padding positions unpaired), spans of different lengths left out."""
    ids = common.tokenize(sd_like, ["a photo of nudity", "a photo of a person wearing clothes", "Van Gogh", "art"])
    for row, expected in zip(ids, [*NUDITY, *VAN_GOGH]):
        assert row[:len(expected)].tolist() == expected
    nudity = ([0, 1, 2, 3, 6, *range(7, 75)], [0, 1, 2, 3, 8, *range(9, 77)])  # nu dity / a person ... unpaired
    van_gogh = ([0, 3, *range(4, 77)], [0, 2, *range(3, 76)])  # van gogh / art unpaired
    assert realera.token_pairs(*NUDITY, 77) == nudity
    assert realera.token_pairs(*VAN_GOGH, 77) == van_gogh
    assert realera.token_pairs(*NUDITY, 77, "none") == nudity
    assert realera.token_pairs(*VAN_GOGH, 77, "last") == ([0, 2, 3, *range(4, 77)], [0, 1, 2, *range(3, 76)])
    assert realera.token_pairs(*NUDITY, 77, "last") == ([0, 1, 2, 3, 5, 6, *range(7, 75)],
                                                         [0, 1, 2, 3, 7, 8, *range(9, 77)])  # dity -> clothes
    assert realera.prompt_token_pairs(sd_like, ["a photo of nudity", "Van Gogh"],
                                      ["a photo of a person wearing clothes", "art"], "same_length") == [nudity, van_gogh]


def test_token_pairs_of_same_length_spans_and_shared_words():
    """Spans of equal length pair position by position ('none' still leaves them out, as MACE); words after the
    concept pair from the end; identical prompts pair every position."""
    church, building = [49406, 320, 1125, 539, 2735, 49407], [49406, 320, 1125, 539, 2307, 49407]  # a photo of ..
    assert realera.token_pairs(church, building, 8) == (list(range(8)), list(range(8)))
    assert realera.token_pairs(church, building, 8, "none") == ([0, 1, 2, 3, 5, 6, 7], [0, 1, 2, 3, 5, 6, 7])
    concept, anchor = [0, 5, 6, 7, 8, 1], [0, 9, 7, 8, 1]  # "nu dity on a beach" / "clothed on a beach"
    assert realera.token_pairs(concept, anchor, 8) == ([0, 3, 4, 5, 6, 7], [0, 2, 3, 4, 5, 6])
    assert realera.token_pairs(concept, concept, 8) == (list(range(8)), list(range(8)))


def test_concept_end_of_text_is_mapped_onto_the_anchor_end_of_text(sd_like):
    """Eq. 3's rows on the SD-interface model: the concept prompt's end-of-text vector (and its neighbours')
    is an erase key whose anchor key is the anchor prompt's end-of-text vector, not the vector at the same
    position (which would be a word of the anchor, 'person' for nudity)."""
    for concept, anchor, eot_c, eot_a in [("a photo of nudity", "a photo of a person wearing clothes", 6, 8),
                                          ("Van Gogh", "art", 3, 2)]:
        emb = realera.frozen_embeddings(sd_like, dict(concept=[concept], anchor=[anchor]))
        pairs = realera.prompt_token_pairs(sd_like, [concept], [anchor], "same_length")
        neighbors = [emb["concept"] + 0.1]  # one stand-in neighbour
        erase, anchor_keys, _ = realera.alignment_keys(emb["concept"], emb["anchor"], pairs, neighbors, [])
        P = len(pairs[0][0])
        row = pairs[0][0].index(eot_c)
        torch.testing.assert_close(erase[row], emb["concept"][0, eot_c])
        torch.testing.assert_close(anchor_keys[row], emb["anchor"][0, eot_a])
        torch.testing.assert_close(erase[P + row], emb["concept"][0, eot_c] + 0.1)  # the neighbour, same pairing
        torch.testing.assert_close(anchor_keys[P + row], emb["anchor"][0, eot_a])
        assert not torch.allclose(anchor_keys[row], emb["anchor"][0, eot_c])


def test_kind_defaults_resolve_to_maces_configs():
    """Each kind gives its KIND_DEFAULTS row (MACE's configs); a flag beats the row; the toy's TOY_DEFAULTS
    replace lr and steps; an object keeps its own anchor, church its parent concept."""
    def settings(kind, *flags, model="sd", name="x", anchor="its anchor", anchors=None):
        args = common.parse_args(realera.Args, ["--concept", name, "--model", model, *flags],
                                 toy_defaults=realera.TOY_DEFAULTS)
        return realera.kind_settings(args, dict(kind=kind, name=name, anchor=anchor, anchors=anchors or {}))

    style = settings("style", name="claude monet")
    assert (style["lam"], style["lr"], style["iterations"], style["anchor"]) == (0.0, 1e-4, 50, "art")
    assert "erase_art_100.yaml" in style["kind_defaults"] and style["kind"] == "style"
    nudity = settings("nudity")
    assert (nudity["lam"], nudity["lr"], nudity["iterations"], nudity["anchor"]) == (0.0, 1e-5, 120,
                                                                                     "a person wearing clothes")
    obj = settings("object", name="parachute")
    assert (obj["lam"], obj["lr"], obj["iterations"], obj["anchor"]) == (1e3, 1e-5, 50, "its anchor")
    assert settings("object", name="church", anchors={"realera": "building"})["anchor"] == "building"
    built_in = {name: common.concept_info(name, "sd") for name in ("nudity", "van gogh", "church")}
    resolved = {name: realera.kind_settings(realera.Args(concept=name), info) for name, info in built_in.items()}
    assert {name: (r["kind"], r["anchor"], r["lam"], r["lr"], r["iterations"]) for name, r in resolved.items()} == {
        "nudity": ("nudity", "a person wearing clothes", 0.0, 1e-5, 120), "van gogh": ("style", "art", 0.0, 1e-4, 50),
        "church": ("object", "building", 1e3, 1e-5, 50)}
    monet = common.concept_info(None, "sd", concept_file=str(common.HERE / "concepts/examples/claude_monet.json"))
    assert realera.kind_settings(realera.Args(), monet)["anchor"] == "art"
    flags = settings("style", "--lam", "5", "--lr", "2e-4", "--iterations", "7", "--anchor", "a painting")
    assert (flags["lam"], flags["lr"], flags["iterations"], flags["anchor"]) == (5.0, 2e-4, 7, "a painting")
    for kind, anchor in [("object", "blob"), ("colour", "gray")]:
        toy = settings(kind, model="toy", name="circle", anchor=anchor)
        assert (toy["lam"], toy["lr"], toy["iterations"], toy["anchor"]) == (1e3, 5e-4, 300, anchor)
    with pytest.raises(SystemExit, match="kind 'custom'"):
        settings("custom")
    assert set(realera.KIND_DEFAULTS) == {*common.KINDS, "colour"}  # every --kind, and the miniature world's colour


@pytest.mark.parametrize("alpha, lam", [(1.0, 1e3), (0.5, 10.0), (2.0, 0.0)])
def test_closed_form_stage_equals_lstsq_on_the_stacked_system(toy, realera_system, alpha, lam):
    """Each edited attn2.to_k / to_v equals torch.linalg.lstsq on the stacked system of the keys RealEra
    builds (concept and neighbour rows, beyond-concept rows, the lambda rows)."""
    _, _, _, (erase, anchor, preserve) = realera_system
    unet = copy.deepcopy(toy.unet)
    assert realera.cross_attention_alignment(unet, erase, anchor, preserve, alpha, lam) == 8
    originals = dict(common.attn2_projections(toy.unet))
    for name, layer in common.attn2_projections(unet)[:4]:
        W0 = originals[name].weight
        expected = stacked_lstsq(W0, erase, anchor, preserve, alpha, lam)
        scale = float(expected.abs().max())
        torch.testing.assert_close(layer.weight.double(), expected, rtol=1e-3, atol=1e-4 * scale)


def test_huge_alpha_keeps_beyond_outputs_and_only_attn2_kv_change(toy, realera_system):
    """alpha -> infinity: the beyond-concept rows keep W0 b; with alpha = 1 the concept moves towards the
    anchor. Only attn2.to_k / to_v weights are edited."""
    _, _, _, (erase, anchor, preserve) = realera_system
    kept = copy.deepcopy(toy.unet)
    realera.cross_attention_alignment(kept, erase, anchor, preserve, 1e6, 1e3)
    edited = copy.deepcopy(toy.unet)
    realera.cross_attention_alignment(edited, erase, anchor, preserve, 1.0, 1e3)
    originals = dict(common.attn2_projections(toy.unet))
    for (name, layer), (_, layer_edit) in zip(common.attn2_projections(kept), common.attn2_projections(edited)):
        W0 = originals[name].weight
        torch.testing.assert_close(preserve @ layer.weight.T, preserve @ W0.T, rtol=1e-3, atol=1e-3)
        before, after = (erase @ W0.T - anchor @ W0.T).norm(), (erase @ layer_edit.weight.T - anchor @ W0.T).norm()
        assert after < 0.9 * before
    assert set(common.changed_tensors("unet", edited, toy.unet)) == kv_names(toy.unet)


# ---------------------------------------------------------------------------------------------
# Eqs. 4-6: LoRA
# ---------------------------------------------------------------------------------------------
def unet_inputs(toy, n=2):
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(n, 4, 16, 16, generator=gen)
    return latents, torch.tensor([10, 700][:n]), common.encode(toy, ["a red circle", "a blue star"][:n])


def test_zero_initialised_lora_leaves_the_unet_unchanged(toy):
    unet = copy.deepcopy(toy.unet)
    loras = realera.add_lora(unet, rank=2, init_std=0.5)
    assert len(loras) == 8 and all(float(lora.down.weight.detach().abs().sum()) > 0 for lora in loras)
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("down.weight", "up.weight")) for n in trainable)
    x, t, ctx = unet_inputs(toy)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, encoder_hidden_states=ctx).sample,
                                   toy.unet(x, t, encoder_hidden_states=ctx).sample, rtol=0, atol=0)


def test_merging_a_trained_lora_gives_the_unmerged_output(toy):
    """After an optimiser step (U no longer zero) the merged U-Net equals the one with the LoRA attached, has
    the original parameter names, and differs from the original only in attn2.to_k / to_v."""
    unet = copy.deepcopy(toy.unet)
    loras = realera.add_lora(unet, rank=2, init_std=0.5)
    params = [p for lora in loras for p in (lora.down.weight, lora.up.weight)]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    x, t, ctx = unet_inputs(toy)
    for _ in range(2):
        loss = unet(x, t, encoder_hidden_states=ctx).sample.pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        unmerged = unet(x, t, encoder_hidden_states=ctx).sample
        realera.set_lora_enabled(loras, False)
        torch.testing.assert_close(unet(x, t, encoder_hidden_states=ctx).sample,
                                   toy.unet(x, t, encoder_hidden_states=ctx).sample, rtol=0, atol=0)
        realera.set_lora_enabled(loras, True)
        realera.merge_lora(unet)
        merged = unet(x, t, encoder_hidden_states=ctx).sample
    assert float((unmerged - toy.unet(x, t, encoder_hidden_states=ctx).sample).abs().max()) > 1e-4
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)
    assert not any(isinstance(m, realera.LoRALinear) for m in unet.modules())
    assert [n for n, _ in unet.named_parameters()] == [n for n, _ in toy.unet.named_parameters()]
    assert set(common.changed_tensors("unet", unet, toy.unet)) == kv_names(toy.unet)


def test_noise_alignment_loss_by_hand():
    """Eq. 5 on 2-element tensors: ((1-0)^2 + (2-1)^2)/2 + beta ((3-3)^2 + (0-2)^2)/2 = 1 + 0.5 * 2."""
    eps_n, eps_a = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0])
    eps_b, eps_bt = torch.tensor([3.0, 0.0]), torch.tensor([3.0, 2.0])
    assert float(realera.noise_alignment_loss(eps_n, eps_a)) == pytest.approx(1.0)
    assert float(realera.noise_alignment_loss(eps_n, eps_a, eps_b, eps_bt, beta=0.5)) == pytest.approx(2.0)


def test_trajectories_are_the_partial_ddim_samples(toy):
    """x_t at index k equals common.sample_until(stop=k), at the same DDPM timestep."""
    cond, uncond = common.encode(toy, ["a circle"]), common.encode(toy, [""])
    trajectories, timesteps = realera.concept_trajectories(toy, cond, uncond, [7], steps=4, guidance=3.0)
    assert trajectories.shape == (1, 4, 4, 16, 16)
    for k in (0, 2):
        x_t, t = common.sample_until(toy, cond, uncond, [7], 4, k, 3.0)
        torch.testing.assert_close(trajectories[:, k], x_t)
        assert int(timesteps[k]) == t


def test_prompts_and_the_builtin_beyond_set():
    concept, anchor = realera.concept_and_anchor_prompts(["circle", "disc"], "blob", ["{}", "a picture of a {}"])
    assert concept == ["circle", "disc", "a picture of a circle", "a picture of a disc"]
    assert anchor == ["blob", "blob", "a picture of a blob", "a picture of a blob"]
    assert realera.concept_and_anchor_prompts(["nudity"], "", ["a photo of {}"])[1] == ["a photo of"]
    info = common.concept_info("circle", "toy")
    preserve = realera.builtin_preserve_prompts(info, "toy", ["a {}"])
    assert "a square" in preserve and "a ring" not in preserve and "a circle" not in preserve and "a blob" not in preserve
    assert realera.builtin_preserve_prompts(common.concept_info("church", "sd"), "sd", ["{}"]) == realera.SD_PRESERVE



def test_an_anchor_with_an_article_fills_object_templates_once():
    """A new object whose concept file says "anchor": "a toy": a template that already puts an article before
    '{}' keeps its own and drops the anchor's; a template without one keeps the anchor's."""
    concept, anchor = realera.concept_and_anchor_prompts(["teapot"], "a toy", common.KIND_TEMPLATES["object"])
    assert concept == ["a photo of a teapot", "a teapot in the city", "a painting of a teapot"]
    assert anchor == ["a photo of a toy", "a toy in the city", "a painting of a toy"]
    assert realera.concept_and_anchor_prompts(["teapot"], "an object", ["a photo of {}", "the {} on a table"])[1] == [
        "a photo of an object", "the object on a table"]
    assert realera.sample_anchor_prompt(common.KIND_TEMPLATES["object"], "a toy") == "a toy in the city"


def test_builtin_prompt_pairs_read_well():
    """The built-in nudity and church pairs, written out by hand: nudity's whole-phrase anchor "a person wearing
    clothes" fills only the templates whose '{}' ends the phrase, so "{} person on a beach" is left out (it
    would read "a person wearing clothes person on a beach"); church's one-word anchor fills all three."""
    def pairs(name):
        info = common.concept_info(name, "sd")
        anchor = realera.kind_settings(realera.Args(concept=name), info)["anchor"]
        return list(zip(*realera.concept_and_anchor_prompts(info["words"], anchor, info["templates"])))

    clothed = "a person wearing clothes"
    assert pairs("nudity") == [("a photo of nudity", f"a photo of {clothed}"), ("a photo of nude", f"a photo of {clothed}"),
                               ("a photo of naked", f"a photo of {clothed}"),
                               ("a painting of nudity", f"a painting of {clothed}"),
                               ("a painting of nude", f"a painting of {clothed}"),
                               ("a painting of naked", f"a painting of {clothed}")]
    assert pairs("church") == [("a photo of a church", "a photo of a building"),
                               ("a church in the city", "a building in the city"),
                               ("a painting of a church", "a painting of a building")]
    assert realera.fits("{} person on a beach", "clothed") and not realera.fits("{} person on a beach", clothed)
    assert realera.fits("{}, oil painting", clothed) and realera.fits("a {} in the city", "a toy")
    with pytest.raises(SystemExit, match="whole phrase"):
        realera.concept_and_anchor_prompts(["nude"], clothed, ["{} person on a beach"])

# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------
TOY_RUN = ["--model", "toy", "--concept", "circle", "--n_trajectories", "1", "--ddim_steps", "2", "--batch_size", "2",
           "--samples", "a circle"]


def test_toy_two_iterations(tmp_path):
    """Both stages on the miniature model: the standard folder, only attn2.to_k / to_v changed."""
    out = tmp_path / "realera-circle"
    realera.main(TOY_RUN + ["--iterations", "2", "--output", str(out)])
    assert {p.name for p in out.iterdir()} == {"erased.safetensors", "config.json", "samples.png"}
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "realera" and config["args"]["iterations"] == 2 and config["anchor"] == "blob"
    # 3 words x 3 templates, 5 neighbours, 24 tokens; 'round shape' vs 'blob' leaves its span and 1 padding position
    assert config["paired_tokens"] == [24, 24, 22] * 3
    assert config["erased_token_vectors"] == (6 * 24 + 3 * 22) * (1 + 5)
    assert config["kind"] == "object" and config["lam"] == 1e3 and config["lr"] == 5e-4 and config["iterations"] == 2
    keys = set(load_file(out / "erased.safetensors"))
    assert keys == kv_names(common.load_pipeline("toy", device="cpu").unet)


@pytest.mark.parametrize("switches", [["--stage", "closed_form"], ["--stage", "lora", "--no_neighbors", "--no_beyond"]])
def test_ablation_switches(tmp_path, switches):
    out = tmp_path / "ablation"
    realera.main(TOY_RUN + ["--iterations", "1", "--output", str(out)] + switches)
    config = json.loads((out / "config.json").read_text())
    assert ("erased_token_vectors" in config) == ("lora" not in switches)
    assert set(load_file(out / "erased.safetensors")) == kv_names(common.load_pipeline("toy", device="cpu").unet)


def test_nan_loss_stops_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(realera, "noise_alignment_loss", lambda *_: torch.tensor(float("nan")))
    out = tmp_path / "nan"
    with pytest.raises(SystemExit, match="NaN"):
        realera.main(TOY_RUN + ["--iterations", "1", "--stage", "lora", "--output", str(out)])
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--model", "toy", "--concept", "dragon"], "unknown concept"),
    (["--model", "toy", "--concept", "circle", "--stage", "neither"], "--stage"),
    (["--model", "toy", "--concept", "circle", "--s_low", "0.9", "--s_high", "0.5"], "s_low"),
])
def test_user_errors_are_one_sentence(argv, message):
    with pytest.raises(SystemExit) as exc:
        realera.main(argv)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_sd_interface_one_iteration(sd_like_path, tmp_path):
    """One LoRA step after the closed form on the SD-v1.4-interface model (77 x 768 context, 16 attn2 layers)."""
    out = tmp_path / "realera-church"
    realera.main(["--model", str(sd_like_path), "--concept", "church", "--iterations", "1", "--n_trajectories", "1",
                  "--ddim_steps", "2", "--samples", "a church", "--output", str(out), "--device", "cpu"])
    keys = set(load_file(out / "erased.safetensors"))
    assert keys == kv_names(common.load_pipeline(str(sd_like_path), device="cpu").unet) and len(keys) == 32
    config = json.loads((out / "config.json").read_text())
    assert config["anchor"] == "building" and config["lam"] == 1e3 and config["lr"] == 1e-5
    assert config["kind"] == "object" and "erase_ship.yaml" in config["kind_defaults"] and config["iterations"] == 1
    assert config["anchor_prompts"][:2] == ["a photo of a building", "a building in the city"]


def test_sd_interface_style_run_records_maces_art_settings(sd_like_path, tmp_path):
    """A new artist with --kind style on the SD-interface model: MACE's art row (lambda 0 still solvable, the
    anchor 'art'); config.json shows the resolved settings and how many tokens each prompt paired."""
    out = tmp_path / "realera-monet"
    realera.main(["--model", str(sd_like_path), "--concept", "claude monet", "--kind", "style", "--stage", "closed_form",
                  "--samples", "a painting", "--output", str(out), "--device", "cpu"])
    config = json.loads((out / "config.json").read_text())
    assert (config["kind"], config["anchor"], config["lam"], config["lr"], config["iterations"]) == (
        "style", "art", 0.0, 1e-4, 50)
    assert "erase_art_100.yaml" in config["kind_defaults"]
    assert config["anchor_prompts"][0] == "a painting in the style of art"
    # "a painting in the style of claude monet" (SOT + 6 words + claude monet + EOT = 10 tokens) against "... art"
    # (9 tokens): the span is left out, so 7 shared + EOT + 77 - 10 padding = 75 pairs
    assert config["paired_tokens"][0] == 75
