"""Oracle tests for sgrace.py (S-GRACE), and end-to-end runs on the miniature and SD-interface models."""
import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file

import common
import sgrace


def toy_args(**overrides):
    argv = ["--model", "toy", "--concept", "circle", "--device", "cpu"]
    for key, value in overrides.items():
        argv += [f"--{key}", str(value)]
    return common.parse_args(sgrace.Args, argv, toy_defaults=sgrace.TOY_DEFAULTS)


def identity(hidden):
    return hidden


@pytest.mark.parametrize("model", ["toy", "sd_like"])
def test_text_forward_on_sample_embeddings_equals_encoder_on_ids(model, request):
    """A sample built by sample_ids, encoded through its token embeddings (the attack's variable),
    gives the text encoder's own output on the ids; the layout is SOT, random ids, words, EOT, padding."""
    pipe = request.getfixturevalue(model)
    random.seed(0)
    ids, last = sgrace.sample_ids(pipe, ["circle", "disc"], n_random=2, separator=" ")
    tok = pipe.tokenizer
    assert ids.shape == (tok.model_max_length,) and ids[0] == tok.bos_token_id and ids[last + 1] == tok.eos_token_id
    assert not set(ids[1:last + 1].tolist()) & set(tok.all_special_ids)
    words = common.tokenize(pipe, ["circle disc"])[0]
    assert torch.equal(ids[3:last + 1], words[1:common.eos_index(pipe, words[None])[0]])
    embeds = pipe.text_encoder.get_input_embeddings()(ids[None])
    with torch.no_grad():
        torch.testing.assert_close(common.text_forward(pipe.text_encoder, embeds), pipe.text_encoder(ids[None])[0],
                                   rtol=1e-5, atol=1e-5)


def test_bare_concept_feature_at_eot_is_the_concept_feature(toy):
    """e_0 read at its EOT position with the frozen encoder is f_c (Eq. 1); read at the last adversarial
    token (official) it is the concept word's own hidden state instead."""
    ids, last = sgrace.sample_ids(toy, ["circle"], 0, ",")
    embeds = toy.text_encoder.get_input_embeddings()(ids[None])
    f_c = sgrace.concept_feature(toy, identity, "circle")
    with torch.no_grad():
        hidden, at_eot = sgrace.sample_features(toy.text_encoder, identity, embeds, torch.tensor([last]), "eot")
        _, at_last = sgrace.sample_features(toy.text_encoder, identity, embeds, torch.tensor([last]), "last")
    torch.testing.assert_close(at_eot, f_c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(at_last, hidden[:, 1])
    assert last == 1


def test_loss_terms_by_hand():
    """Each term of Eq. (4)-(8) on fixed tensors, worked by hand."""
    features = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    f_c = torch.tensor([[3.0, 0.0]])  # cosines 1 and 0
    assert math.isclose(sgrace.push_loss(features, f_c).item(), 1.5, rel_tol=1e-6)
    assert math.isclose(sgrace.concept_similarity_loss(features, f_c).item(), 0.5, rel_tol=1e-6)
    features_0 = torch.tensor([[1.0, 1.0], [0.0, -1.0]])  # row-wise cosines 1/sqrt(2) and -1
    expected = 1 - (1 / math.sqrt(2) - 1) / 2
    assert math.isclose(sgrace.keep_loss(features, features_0).item(), expected, rel_tol=1e-6)
    eps, x_T = torch.full((2, 1, 2, 2), 3.0), torch.ones(1, 1, 2, 2)  # squared error 4 everywhere
    assert math.isclose(sgrace.reconstruction_loss(eps, x_T).item(), 4.0, rel_tol=1e-6)
    assert math.isclose(sgrace.attack_loss(eps, x_T, features, f_c, 0.1).item(), 4.0 + 0.1 * 0.5, rel_tol=1e-6)
    params = [torch.tensor([1.0, -2.0]), torch.tensor([[0.0, 0.0], [0.0, 4.0]])]
    params_0 = [torch.zeros(2), torch.zeros(2, 2)]
    assert math.isclose(sgrace.param_loss(params, params_0).item(), 1.5 + 1.0, rel_tol=1e-6)
    hidden, hidden_0 = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]), torch.tensor([[[1.0, 0.0], [0.0, 4.0]]])
    assert math.isclose(sgrace.anchor_loss(hidden, hidden_0).item(), (0 + 4 + 9 + 0) / 4, rel_tol=1e-6)


def test_attack_moves_only_adversarial_tokens_and_pgd_stays_in_its_ball(toy):
    """The signed attack changes the adversarial positions only (SOT, EOT, padding are fixed); with
    --pgd_radius every coordinate stays within the radius of the round's start."""
    random.seed(0)
    args = toy_args(adv_samples=3, attack_steps=3, pgd_radius=0.05)
    settings = sgrace.concept_settings(args, common.concept_info("circle", "toy"))
    ids, embeds, last = sgrace.draw_samples(toy, ["circle", "disc", "round shape"], settings, args)
    positions = torch.arange(ids.shape[1])
    mask = (positions[None] >= 1) & (positions[None] <= last[:, None])
    x_T = common.initial_latents(toy, [0])
    z, f_c = torch.randn_like(x_T), sgrace.concept_feature(toy, identity, "circle")
    for radius in (0.0, 0.05):
        args.pgd_radius = radius
        new, loss = sgrace.attack(toy.text_encoder, toy.unet, identity, embeds, mask, last, z, 800, x_T, f_c, 0.3, args)
        moved = (new - embeds).abs().amax(-1) > 0
        assert math.isfinite(loss) and moved.any() and not (moved & ~mask).any()
        if radius:
            assert (new - embeds).abs().max() <= radius + 1e-6
        else:
            assert (new - embeds).abs().max() > 0.05  # 3 steps of lr 0.3, unconstrained


def test_zero_erasure_steps_leave_the_text_encoder_unchanged(toy):
    random.seed(0)
    text_encoder, _ = sgrace.train(toy_args(rounds=1, attack_steps=1, erase_steps=0), toy, {})
    assert common.changed_tensors("text_encoder", text_encoder, toy.text_encoder) == {}


def test_training_changes_only_the_text_encoder_layers(toy):
    """After erasure steps the U-Net is bit-identical and the token/position embeddings are unchanged;
    the transformer layers moved, and the concept's features moved away from f_c."""
    unet_before = {k: v.clone() for k, v in toy.unet.state_dict().items()}
    random.seed(0)
    text_encoder, extra = sgrace.train(toy_args(rounds=2, attack_steps=1, erase_steps=3), toy, {})
    assert all(torch.equal(v, unet_before[k]) for k, v in toy.unet.state_dict().items())
    changed = common.changed_tensors("text_encoder", text_encoder, toy.text_encoder)
    assert changed and all(sgrace.trainable(k.split(".", 1)[1]) for k in changed)
    assert not any("embeddings" in k for k in changed)
    assert extra["related"][0] == "circle" and not set(extra["related"]) & {"orb", "round disk"}


def test_vocabulary_fallback_excludes_held_out_words(toy):
    related, unrelated = sgrace.vocabulary_neighbours(toy, "circle", 10, ["orb", "round disk"])
    assert len(related) == len(unrelated) == 10
    assert not set(related + unrelated) & {"orb", "round", "disk", "circle"}
    assert not set(related) & set(unrelated)


def test_concept_settings_table_and_flags():
    args = common.parse_args(sgrace.Args, ["--concept", "nudity", "--w_sim", "2"])
    settings = sgrace.concept_settings(args, common.concept_info("nudity", common.SD14))
    assert settings["kind"] == "harmful" and settings["p_update"] == 0.8 and settings["n_anchors"] == 16
    assert settings["w_sim"] == 2.0  # a flag beats the table
    church = sgrace.concept_settings(common.parse_args(sgrace.Args, ["--concept", "church"]),
                                     common.concept_info("church", common.SD14))
    assert (church["random_ids"], church["max_words"], church["w_param"]) == (0, 20, 0.2)


def custom_info(kind, name="claude monet"):
    return dict(kind=kind, name=name, words=[name], held_out=[], near=[], anchor="", others=[],
                templates=["{}", "a photo of {}", "a painting of {}"])


def test_a_concept_without_a_row_takes_its_kind_row():
    """A concept SETTINGS does not list gets its kind's row (KIND_ROWS), not church's: a style van gogh's
    (adv lr 0.005, p_update 0.15, 0 random ids, 3-20 words, w_sim 1.2, w_anchor 1, 8 anchors, w_param 0.2, the
    prompt 'a picture of c'), nudity nudity's, an object church's; a listed concept keeps its own row."""
    args = common.parse_args(sgrace.Args, ["--concept", "claude monet"])
    style = sgrace.concept_settings(args, custom_info("style"))
    assert style["row"] == "van gogh" and style["kind"] == "style"
    assert [style[k] for k in ("adv_lr", "p_update", "random_ids", "min_words", "max_words", "w_sim", "w_anchor",
                               "n_anchors", "w_param")] == [0.005, 0.15, 0, 3, 20, 1.2, 1.0, 8, 0.2]
    nudity = sgrace.concept_settings(args, custom_info("nudity", "topless"))
    assert (nudity["row"], nudity["kind"], nudity["random_ids"], nudity["n_anchors"]) == ("nudity", "harmful", 5, 16)
    snoopy = sgrace.concept_settings(args, custom_info("object", "snoopy"))
    assert (snoopy["row"], snoopy["kind"], snoopy["w_sim"]) == ("church", "object", 1.0)
    picasso = sgrace.concept_settings(args, custom_info("style", "picasso"))
    assert (picasso["row"], picasso["adv_lr"], picasso["random_ids"], picasso["w_anchor"]) == ("picasso", 0.01, 3, 2.0)
    assert sgrace.concept_settings(args, common.concept_info("red", "toy"))["row"] == "church"
    with pytest.raises(SystemExit, match="--kind"):
        sgrace.concept_settings(args, custom_info("custom"))


def test_kind_beats_the_rows_of_the_concepts_name():
    """A concept's own SETTINGS row is used only when its prompt kind agrees with the concept's kind: church as a
    style takes van gogh's row ('a picture of c', 3-20 words, w_sim 1.2), nudity as an object church's (0 random
    ids, 8 anchors), while parachute as an object and violence as nudity keep their own rows."""
    args = common.parse_args(sgrace.Args, ["--concept", "church", "--kind", "style"])
    church_style = sgrace.concept_settings(args, common.concept_info("church", common.SD14, kind="style"))
    assert (church_style["row"], church_style["kind"], church_style["w_sim"], church_style["max_words"]) == (
        "van gogh", "style", 1.2, 20)
    nudity_object = sgrace.concept_settings(args, common.concept_info("nudity", common.SD14, kind="object"))
    assert (nudity_object["row"], nudity_object["kind"], nudity_object["random_ids"], nudity_object["n_anchors"]) == (
        "church", "object", 0, 8)
    parachute = sgrace.concept_settings(args, common.concept_info("parachute", common.SD14, kind="object"))
    assert (parachute["row"], parachute["w_sim"]) == ("parachute", 1.2)
    violence = sgrace.concept_settings(args, common.concept_info("violence", common.SD14, kind="nudity"))
    assert (violence["row"], violence["kind"], violence["w_sim"]) == ("violence", "harmful", 1.1)
    church = sgrace.concept_settings(args, common.concept_info("church", common.SD14))
    assert (church["row"], church["kind"]) == ("church", "object")


def test_the_concepts_first_word_is_erased_and_its_name_only_names(sd_like, tmp_path):
    """A concept file {"name": "x", "words": ["teapot"]}: f_c, the latent prompt and R's first entry are
    "teapot" (the official code's concept text), never "x". The built-in concepts keep their prompts: "nudity"
    and "a photo of church" as before; van gogh's first word "Van Gogh" gives "a picture of Van Gogh", the
    same CLIP tokens as the name's "a picture of van gogh", and R drops the name's case-duplicate of it."""
    path = tmp_path / "x.json"
    path.write_text(json.dumps(dict(name="x", kind="object", words=["teapot"], related=["kettle"], unrelated=["table"])))
    args = common.parse_args(sgrace.Args, ["--concept_file", str(path), "--projection", "none"])
    state = sgrace.concept_state(args, sd_like, common.concept_info(None, common.SD14, concept_file=str(path)), identity)
    assert state["prompt"] == "a photo of teapot" and state["related"] == ["teapot", "kettle"]
    torch.testing.assert_close(state["f_c"], common.pooled_features(sd_like, ["teapot"]))
    built_in = {}
    for name in ("nudity", "van gogh", "church"):
        args = common.parse_args(sgrace.Args, ["--concept", name, "--projection", "none"])
        built_in[name] = sgrace.concept_state(args, sd_like, common.concept_info(name, common.SD14), identity)
    assert {n: s["prompt"] for n, s in built_in.items()} == {
        "nudity": "nudity", "van gogh": "a picture of Van Gogh", "church": "a photo of church"}
    assert torch.equal(*common.tokenize(sd_like, ["a picture of Van Gogh", "a picture of van gogh"]))
    assert [s["related"][:2] for s in built_in.values()] == [["nudity", "nude"], ["Van Gogh", "Vincent van Gogh"],
                                                             ["church", "steeple"]]
    assert len(built_in["van gogh"]["related"]) == 20  # the file's 20 ("Van Gogh" first), not 21 with "van gogh"


def test_a_number_given_to_samples_points_to_adv_samples(tmp_path):
    """An old command, `--samples 8` from before the rename to --adv_samples, stops with one sentence and writes
    nothing (it would have drawn a picture of the prompt "8")."""
    out = tmp_path / "erased"
    with pytest.raises(SystemExit, match=r"--adv_samples 8\.$"):
        sgrace.main(["--model", "toy", "--concept", "circle", "--samples", "a circle", "8", "--output", str(out)])
    assert not out.exists()


def official_draws(seed, related, n_samples, lo, hi, p_update, rounds):
    """Python's random as the official train.py spends it: per round one word count (random.randint); in round 1
    random.sample([c], 1) for e_0 (the extra draw), then random.sample(R, n) for e_1..e_{K-1}; then t
    (random.sample(range(750, 950), 1)); from round 2 random.random() < p_update per sample and a re-draw.
    Returns the words of every drawn sample, in order, and t."""
    random.seed(seed)
    draws = []
    n = random.randint(lo, hi)
    draws.append(random.sample(related[:1], 1))
    draws += [random.sample(related, n) for _ in range(1, n_samples)]
    t = random.sample(range(750, 950), 1)[0]
    for _ in range(1, rounds):
        n = random.randint(lo, hi)
        draws += [random.sample(related, n) for _ in range(n_samples) if random.random() < p_update]
    return draws, t


def test_a_seed_draws_the_official_samples(sd_like):
    """With the same seed, draw_samples and the few-shot t spend Python's random as the official script does, so
    they pick the same words: the e_0 draw included, random ids (torch's generator, as official) or not."""
    related = ["church", "steeple", "spire", "altar", "pews", "nave", "choir", "priest", "hymn", "chapel bell"]
    for random_ids in (0, 3):
        args = common.parse_args(sgrace.Args, ["--concept", "church", "--adv_samples", "4", "--random_ids",
                                               str(random_ids), "--min_words", "2", "--max_words", "4",
                                               "--p_update", "0.5", "--projection", "none"])
        settings = sgrace.concept_settings(args, custom_info("object", "church"))
        expected, t_expected = official_draws(7, related, 4, 2, 4, 0.5, rounds=3)
        random.seed(7)
        ours = []
        ids, embeds, last = sgrace.draw_samples(sd_like, related, settings, args)
        ours += [ids[k, 1 + random_ids * (k > 0):last[k] + 1] for k in range(4)]
        t = random.randrange(args.timestep_low, args.timestep_high)  # few_shot_latent's draw
        old = (ids, embeds, last)
        for _ in range(2):
            ids, embeds, last = sgrace.draw_samples(sd_like, related, settings, args, old=old)
            ours += [ids[k, 1 + random_ids:last[k] + 1] for k in range(4) if not torch.equal(ids[k], old[0][k])]
            old = (ids, embeds, last)
        assert t == t_expected and len(ours) == len(expected) > 4
        for got, words in zip(ours, expected):
            want = common.tokenize(sd_like, [",".join(words)])[0]
            assert torch.equal(got, want[1:common.eos_index(sd_like, want[None])[0]])


def test_token_limit_keeps_75_minus_r_word_tokens(sd_like):
    """Real CLIP tokenizer, 40 x 'church' joined by ',': 79 tokens, cut by the tokenizer to 75 (church , church ...
    church: 38 churches, 37 commas). With r = 0 random ids all 75 stay (the official slice [:-0] would keep none);
    with r = 2, 73 stay (as official); with exactly 73 word tokens and r = 2 all 73 stay (official: none)."""
    church, comma = common.tokenize(sd_like, ["church,"])[0][1:3].tolist()
    for words, r, kept in [(["church"] * 40, 0, 75), (["church"] * 40, 2, 73), (["church"] * 37, 2, 73)]:
        ids, last = sgrace.sample_ids(sd_like, words, r, ",")
        assert last == r + kept and ids[last + 1] == sd_like.tokenizer.eos_token_id
        assert ids[1 + r:last + 1].tolist() == [church if i % 2 == 0 else comma for i in range(kept)]


def test_fallback_lists_are_word_final_tokens_without_the_concepts_pieces(sd_like):
    """The real CLIP tokenizer splits 'nudity' into 'nu' + the word-final piece 'dity</w>', and the held-out word
    'nakedness' into 'naked' + 'ness</w>'. With the token embeddings of 'ness</w>' and 'naked</w>' set to the
    concept's mean (so they would be the nearest), no piece enters R or U, nor a synonym or held-out word; every
    entry is an end-of-word token of 3+ letters. What the docstring admits: a word ending such as 'lish' (of
    'english') encodes alone to its one token exactly as the word 'church' does, so no tokenizer test can keep
    it out."""
    tok = sd_like.tokenizer
    assert tok.tokenize("lish") == ["lish</w>"] and tok.tokenize("church") == ["church</w>"]
    assert sgrace.token_pieces(tok, ["nudity", "nakedness"]) == {"nu", "dity", "naked", "ness"}
    table = sd_like.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        mean = table[tok.convert_tokens_to_ids(["nu", "dity</w>"])].mean(0)
        table[tok.convert_tokens_to_ids(["ness</w>", "naked</w>"])] = mean
    related, unrelated = sgrace.vocabulary_neighbours(sd_like, "nudity", 200, ["nude", "nakedness", "without clothes"])
    assert len(related) == len(unrelated) == 200 and not set(related) & set(unrelated)
    assert not set(related + unrelated) & {"nu", "dity", "nude", "naked", "ness", "nakedness", "without", "clothes"}
    assert all(f"{w}</w>" in tok.get_vocab() and len(w) >= 3 and w.isalpha() for w in related + unrelated)


def test_word_lists_prefer_the_concept_files_lists(sd_like, tmp_path):
    """A concept file's 'related' / 'unrelated' are used when present; --related still beats them; without either
    the fallback fills the missing list only."""
    info = dict(custom_info("style"), related=["impressionism", "water lilies"], unrelated=["pond", "bridge"])
    args = common.parse_args(sgrace.Args, ["--concept", "claude monet"])
    assert sgrace.word_lists(args, sd_like, info) == (["claude monet", "impressionism", "water lilies"], ["pond", "bridge"])
    (tmp_path / "r.txt").write_text("haystacks\n")
    args = common.parse_args(sgrace.Args, ["--concept", "claude monet", "--related", str(tmp_path / "r.txt")])
    assert sgrace.word_lists(args, sd_like, info)[0] == ["claude monet", "haystacks"]
    args = common.parse_args(sgrace.Args, ["--concept", "claude monet", "--fallback_words", "5"])
    related, unrelated = sgrace.word_lists(args, sd_like, dict(custom_info("style"), related=["impressionism"]))
    assert related == ["claude monet", "impressionism"] and len(unrelated) == 5


def test_toy_end_to_end_two_rounds(tmp_path):
    out = tmp_path / "erased"
    sgrace.main(["--model", "toy", "--concept", "red", "--device", "cpu", "--rounds", "2", "--attack_steps", "2",
                 "--erase_steps", "2", "--samples", "a red thing", "--output", str(out)])
    assert {p.name for p in out.iterdir()} == {"erased.safetensors", "config.json", "samples.png"}
    tensors = load_file(out / "erased.safetensors")
    assert tensors and all(k.startswith("text_encoder.") and sgrace.trainable(k.split(".", 1)[1]) for k in tensors)
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "sgrace" and config["args"]["concept"] == "red" and config["attack_seconds"] > 0
    assert config["args"]["adv_samples"] == 8 and config["args"]["samples"] == ["a red thing"]
    pipe = common.load_pipeline("toy", erased=out, device="cpu")
    name = next(iter(tensors)).split(".", 1)[1]
    assert torch.equal(dict(pipe.text_encoder.named_parameters())[name].detach(), tensors[f"text_encoder.{name}"])


def test_nan_loss_stops_and_writes_nothing(tmp_path, monkeypatch):
    out = tmp_path / "erased"
    monkeypatch.setattr(sgrace, "anchor_loss", lambda hidden, hidden_0: (hidden - hidden_0).sum() * float("nan"))
    with pytest.raises(SystemExit, match="NaN"):
        sgrace.main(["--model", "toy", "--concept", "circle", "--device", "cpu", "--rounds", "1", "--attack_steps",
                     "1", "--erase_steps", "2", "--output", str(out)])
    assert not out.exists()


def test_sd_interface_one_round(sd_like_path, tmp_path, monkeypatch):
    """One round on the tiny SD-v1.4-interface model (77 tokens, 768-d), the AdvUnlearn-style options. samples.png
    shows, in church's second template 'a {} in the city', the concept, a held-out word and a near concept."""
    shown = []
    before_after = common.before_after
    monkeypatch.setattr(common, "before_after", lambda pipe, prompts, *a, **k: shown.append(prompts) or before_after(
        pipe, prompts, *a, **k))
    out = tmp_path / "erased"
    sgrace.main(["--model", str(sd_like_path), "--concept", "church", "--device", "cpu", "--projection", "none",
                 "--rounds", "1", "--attack_steps", "1", "--erase_steps", "1", "--adv_samples", "2", "--output", str(out)])
    tensors = load_file(out / "erased.safetensors")
    assert tensors and all(k.startswith("text_encoder.") for k in tensors)
    config = json.loads((out / "config.json").read_text())
    assert config["prompt"] == "a photo of church" and config["settings"]["max_words"] == 20
    assert config["settings"]["row"] == "church" and config["args"]["samples"] == []
    assert shown[0] == ["a church in the city", "a chapel in the city", "a castle in the city"]
    out_esd = tmp_path / "esd"
    sgrace.main(["--model", str(sd_like_path), "--concept", "church", "--device", "cpu", "--projection", "none",
                 "--rounds", "1", "--attack_steps", "1", "--erase_steps", "1", "--adv_samples", "1", "--init", "target",
                 "--random_ids", "1", "--semantic_weight", "0", "--erase_loss", "esd", "--output", str(out_esd)])
    assert load_file(out_esd / "erased.safetensors")
    out_style = tmp_path / "style"
    sgrace.main(["--model", str(sd_like_path), "--concept", "claude monet", "--kind", "style", "--device", "cpu",
                 "--projection", "none", "--rounds", "1", "--attack_steps", "1", "--erase_steps", "1", "--adv_samples",
                 "2", "--latent_steps", "2", "--fallback_words", "8", "--sample_steps", "1", "--output", str(out_style)])
    config = json.loads((out_style / "config.json").read_text())
    assert config["settings"]["row"] == "van gogh" and config["prompt"] == "a picture of claude monet"
    assert config["related"][0] == "claude monet" and len(config["unrelated"]) == 8


def test_random_ids_never_draw_held_out_words(toy):
    """The generality test's held-out words must not leak into training through the random prefix ids."""
    banned = frozenset(common.tokenize(toy, ["orb round disk"])[0].tolist()) - set(toy.tokenizer.all_special_ids)
    assert banned
    for _ in range(50):
        ids, last = sgrace.sample_ids(toy, ["circle"], n_random=5, separator=" ", banned=banned)
        assert not set(ids[1:6].tolist()) & banned
