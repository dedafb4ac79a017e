"""Oracle tests for domain_correction.py (DoCo), and end-to-end runs on the miniature and SD-interface models."""
import json
import math
import random

import pytest
import torch
from diffusers import DDIMScheduler
from safetensors.torch import load_file

import common
import domain_correction as dc


def kv_names(unet) -> set[str]:
    return {f"unet.{n}" for n, _ in unet.named_parameters() if "attn2.to_k" in n or "attn2.to_v" in n}


def test_predicted_x0_inverts_add_noise():
    """Eq. (2) recovers z0 from z_t = scheduler.add_noise(z0, eps, t) and the true eps, at every t."""
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    gen = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(6, 4, 8, 8, generator=gen), torch.randn(6, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 1, 250, 500, 900, 999])
    z_t = scheduler.add_noise(z0, eps, t)
    torch.testing.assert_close(dc.predicted_x0(scheduler, z_t, eps, t), z0, rtol=1e-4, atol=1e-4)


def test_project_conflicting_by_hand():
    """PCGrad on a 2-d example worked by hand: g_u = (1, 0), g_r = (-1, 1), <g_u, g_r> = -1, ||g_r||^2 = 2."""
    g_u, g_r = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    (full,), n = dc.project_conflicting([g_u], [g_r], lam=1.0)
    torch.testing.assert_close(full, torch.tensor([0.5, 0.5]))  # (1,0) - (-1/2)(-1,1)
    assert n == 1 and abs(float(full @ g_r)) < 1e-7
    (half,), _ = dc.project_conflicting([g_u], [g_r], lam=0.5)
    torch.testing.assert_close(half, torch.tensor([0.75, 0.25]))  # (1,0) - 0.5 (-1/2)(-1,1)
    (same,), n = dc.project_conflicting([g_u], [torch.tensor([1.0, 1.0])])
    assert n == 0 and torch.equal(same, g_u)


def test_projected_gradient_never_conflicts_with_retain_gradient():
    """After projection <g_u', g_r> >= 0 for every tensor; a non-conflicting g_u is returned unchanged."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(48, 64), (48,), (96, 64), (7, 3, 3), (320, 768)] * 4
    retain = [torch.randn(s, generator=gen) for s in shapes]
    unlearn = [torch.randn(s, generator=gen) - (2.0 if i % 2 else -0.5) * r for i, (s, r) in enumerate(zip(shapes, retain))]
    conflicting = [float((u * r).sum()) < 0 for u, r in zip(unlearn, retain)]
    assert 0 < sum(conflicting) < len(shapes)
    projected, n = dc.project_conflicting(unlearn, retain)
    assert n == sum(conflicting)
    for g_u, g_new, g_r, was_conflicting in zip(unlearn, projected, retain, conflicting):
        assert float((g_new.double() * g_r.double()).sum()) >= -1e-6 * float(g_new.norm() * g_r.norm())
        if not was_conflicting:
            assert torch.equal(g_new, g_u)


def test_official_variant_equals_pcgrad_only_for_unit_norm_gradients():
    """Official: g_u - lam cos(g_u, g_r) g_r/||g_r|| after clipping. For ||g_u|| = lam it is PCGrad; for a
    smaller g_u it overshoots past orthogonal (positive inner product with g_r)."""
    gen = torch.Generator().manual_seed(2)
    g_r = [torch.randn(16, 8, generator=gen) for _ in range(3)]
    g_u = [(torch.randn(16, 8, generator=gen) - 3 * r) for r in g_r]
    unit = [u / u.norm() for u in g_u]
    official, n = dc.official_adjust(unit, g_r, lam=1.0, max_norm=1e9)
    pcgrad, _ = dc.project_conflicting(unit, g_r, lam=1.0)
    assert n == 3
    for a, b in zip(official, pcgrad):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    small = [0.3 * u for u in unit]
    for g_new, r in zip(dc.official_adjust(small, g_r, lam=1.0, max_norm=1e9)[0], g_r):
        assert float((g_new * r).sum()) > 1e-3 * float(r.norm())
    clipped = dc.clip_global_norm([10 * u for u in unit], 1.0)
    assert abs(math.sqrt(sum(float(c.pow(2).sum()) for c in clipped)) - 1.0) < 1e-4


def test_gan_losses_follow_the_official_label_convention():
    """Anchor outputs are labelled 0 and target outputs 1 for D; the generator wants its targets read as 0.
    BCE-with-logits: label 0 -> log(1 + e^x), label 1 -> log(1 + e^-x), averaged over patches."""
    d_anchor = torch.tensor([[[[0.0, 1.0], [-2.0, 3.0]]]])
    d_target = torch.tensor([[[[2.0, -1.0], [0.5, 0.0]]]])
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
    expected_d = (sum(softplus(x) for x in [0.0, 1.0, -2.0, 3.0]) + sum(softplus(-x) for x in [2.0, -1.0, 0.5, 0.0])) / 4
    expected_g = sum(softplus(x) for x in [2.0, -1.0, 0.5, 0.0]) / 4
    assert abs(float(dc.discriminator_loss(d_anchor, d_target)) - expected_d) < 1e-6
    assert abs(float(dc.generator_loss(d_target)) - expected_g) < 1e-6
    confident = torch.full((2, 1, 3, 3), 20.0)  # D sure the targets are targets
    assert float(dc.discriminator_loss(-confident, confident)) < 1e-6 and float(dc.generator_loss(confident)) > 19
    assert float(dc.generator_loss(-confident)) < 1e-6  # fooled D: the generator has won


@pytest.mark.parametrize("size", [8, 16, 32, 64])
def test_discriminator_sizes_itself_to_the_latents(size):
    disc = dc.patch_discriminator(size)
    assert disc(torch.randn(2, 4, size, size)).shape == (2, 1, 3, 3)
    if size == 64:  # exactly the official PatchGAN
        convs = [m for m in disc if isinstance(m, torch.nn.Conv2d)]
        assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
        assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in disc) == 3


def test_forget_prompts_and_anchor_captions():
    rng = random.Random(0)
    assert dc.forget_prompt("a red blob on a dark background", "blob", "circle", "replace", rng) == "a red circle on a dark background"
    assert dc.forget_prompt("a party with art", "art", "nudity", "replace", rng) == "a party with nudity"
    styled = dc.forget_prompt("a painting of a house", "painting", "Van Gogh", "append", rng)
    assert styled in ("a painting of a house, in the style of Van Gogh", "in Van Gogh's style, a painting of a house")
    for concept, anchor in [("circle", "blob"), ("red", "gray")]:
        captions = dc.anchor_captions(common.concept_info(concept, "toy"), anchor, "toy", rng)
        assert len(captions) > 10 and all(anchor in c.split() for c in captions)
    assert all("painting" in c for c in dc.anchor_captions(common.concept_info("van gogh", "sd"), "painting", "sd", rng))


class Cycle:
    """A stand-in for random.Random whose randrange returns 0, 1, 2, 0, ... in turn."""
    def __init__(self):
        self.calls = 0

    def randrange(self, n):
        self.calls += 1
        return (self.calls - 1) % n


def test_style_forget_prompts_split_one_third_two_thirds():
    """The official __getprompt__ draws r from {0, 1, 2}: r = 0 gives '<caption>, in the style of <word>', r = 1 or 2
    "in <word>'s style, <caption>". Three draws 0, 1, 2 give the first form once and the second twice; a seeded
    run of 3000 lands near 1000 : 2000."""
    rng = Cycle()
    prompts = [dc.forget_prompt("a painting of a house", "painting", "Monet", "append", rng) for _ in range(3)]
    assert prompts == ["a painting of a house, in the style of Monet", "in Monet's style, a painting of a house",
                       "in Monet's style, a painting of a house"]
    rng = random.Random(0)
    first = sum(dc.forget_prompt("c", "a", "w", "append", rng).startswith("c, ") for _ in range(3000))
    assert abs(first - 1000) < 90  # 1000 +- 3.5 standard deviations (sqrt(3000 * 1/3 * 2/3) = 25.8)


def sd_info(kind, anchor="", words=("claude monet",)):
    return dict(kind=kind, name=words[0], words=list(words), held_out=[], near=[], anchor=anchor, others=[],
                templates=["{}", "a photo of {}", "a painting of {}"])


def test_each_kind_resolves_to_its_row_and_a_flag_beats_it():
    """KIND_DEFAULTS, read off the official README's three runs: styles map onto 'painting' with appended style
    phrases and dlr 5e-4; nudity onto 'clothed', replaced, 1e-4; objects onto their own anchor (article dropped),
    replaced, 1e-4; the miniature world's objects and colours onto blob and gray (toy dlr 1e-3)."""
    sd_args = lambda *flags: common.parse_args(dc.Args, ["--concept", "claude monet", *flags])  # noqa: E731
    style = dc.concept_settings(sd_args(), sd_info("style", anchor="art"))
    assert (style["kind"], style["anchor"], style["forget_mode"], style["dlr"]) == ("style", "painting", "append", 5e-4)
    assert "Unlearning Style" in style["defaults"] and style["words"] == ["claude monet"]
    nudity = dc.concept_settings(sd_args(), sd_info("nudity", words=("nudity", "nude")))
    assert (nudity["anchor"], nudity["forget_mode"], nudity["dlr"]) == ("clothed", "replace", 1e-4)
    church = dc.concept_settings(sd_args(), sd_info("object", anchor="a building", words=("church",)))
    assert (church["anchor"], church["forget_mode"], church["dlr"]) == ("building", "replace", 1e-4)
    assert church["retain_weight"] == 0.0
    own = dc.concept_settings(sd_args(), dict(sd_info("style"), anchors={"domain_correction": "oil painting"}))
    assert own["anchor"] == "oil painting"  # the concept file's own DoCo anchor beats the row's
    flags = dc.concept_settings(sd_args("--anchor", "art", "--forget_mode", "replace", "--dlr", "3e-4", "--surgery", "none"),
                                sd_info("style"))
    assert (flags["anchor"], flags["forget_mode"], flags["dlr"], flags["retain_weight"]) == ("art", "replace", 3e-4, 0.1)
    for concept, anchor in [("circle", "blob"), ("red", "gray")]:
        toy = dc.concept_settings(common.parse_args(dc.Args, ["--model", "toy", "--concept", concept],
                                                    toy_defaults=dc.TOY_DEFAULTS), common.concept_info(concept, "toy"))
        assert (toy["anchor"], toy["forget_mode"], toy["dlr"]) == (anchor, "replace", dc.TOY_DEFAULTS["dlr"])
    with pytest.raises(SystemExit, match="--anchor"):
        dc.concept_settings(sd_args(), sd_info("object"))
    with pytest.raises(SystemExit, match="--kind"):
        dc.concept_settings(sd_args(), sd_info("custom"))


TOY_RUN = ["--model", "toy", "--concept", "circle", "--iterations", "2", "--warm_up", "1", "--batch_size", "2",
           "--n_anchor_images", "3", "--anchor_steps", "2", "--samples", "a circle"]


def test_toy_two_iterations_then_rerun_reuses_anchor_images(tmp_path, monkeypatch, capsys):
    """Two steps (one discriminator-only, one generator) write the erased model; only attn2.to_k/to_v
    change; a second run with the same settings takes its anchor images from the output folder."""
    out = tmp_path / "doco-circle"
    dc.main(TOY_RUN + ["--output", str(out)])
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "domain_correction" and config["args"]["iterations"] == 2
    assert (out / "samples.png").exists()
    keys = set(load_file(out / "erased.safetensors"))
    assert keys == kv_names(common.load_pipeline("toy", device="cpu").unet)
    meta = json.loads((out / "anchor_images" / "meta.json").read_text())
    assert len(meta["captions"]) == 3 and all("blob" in c for c in meta["captions"])

    def regenerate(*_args, **_kwargs):
        raise AssertionError("anchor images were generated again")

    monkeypatch.setattr(dc, "generate_anchor_images", regenerate)
    capsys.readouterr()
    dc.main(TOY_RUN + ["--output", str(out)])
    assert "reusing 3 anchor images" in capsys.readouterr().out
    assert (out / "anchor_images" / "0002.png").exists()


def test_nan_loss_stops_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(dc, "retain_loss", lambda *_: torch.tensor(float("nan")))
    out = tmp_path / "nan"
    with pytest.raises(SystemExit, match="NaN"):
        dc.main(["--model", "toy", "--concept", "red", "--iterations", "1", "--warm_up", "0", "--batch_size", "1",
                 "--n_anchor_images", "1", "--anchor_steps", "1", "--output", str(out)])
    assert not out.exists()


def test_sd_interface_one_iteration(sd_like_path, tmp_path):
    """One generator step on the SD-v1.4-interface model (8x8 latents, 16 attn2 layers, 77x768 context), church
    and a new artist (--kind style): config.json records the settings each kind resolved to."""
    out = tmp_path / "doco-church"
    dc.main(["--model", str(sd_like_path), "--concept", "church", "--iterations", "1", "--warm_up", "0",
             "--batch_size", "1", "--n_anchor_images", "2", "--anchor_steps", "2", "--samples", "a church",
             "--output", str(out), "--device", "cpu"])
    keys = set(load_file(out / "erased.safetensors"))
    assert keys == kv_names(common.load_pipeline(str(sd_like_path), device="cpu").unet) and len(keys) == 32
    config = json.loads((out / "config.json").read_text())
    assert config["anchor"] == "building" and config["dlr"] == 1e-4 and config["args"]["lr"] == 4.8e-5
    assert config["kind"] == "object" and config["forget_mode"] == "replace" and not config["args"]["sot_gradient"]
    out = tmp_path / "doco-style"
    dc.main(["--model", str(sd_like_path), "--concept", "claude monet", "--kind", "style", "--iterations", "1", "--warm_up", "0",
             "--batch_size", "1", "--n_anchor_images", "1", "--anchor_steps", "1", "--samples", "a painting",
             "--sample_steps", "1", "--output", str(out), "--device", "cpu"])
    config = json.loads((out / "config.json").read_text())
    assert (config["kind"], config["anchor"], config["forget_mode"], config["dlr"]) == ("style", "painting", "append", 5e-4)
    assert "Unlearning Style" in config["defaults"]
    assert json.loads((out / "anchor_images" / "meta.json").read_text())["captions"] == ["a painting of a house"]


def test_start_token_gradient_stop_by_hand():
    """One attn2.to_k with weight W = [[1, 1]] on a context of three positions x0 = (1, 0), x1 = (0, 2), x2 = (3, 0).
    The keys are 1, 2, 3 with or without the stop. d sum(keys)/dW = x0 + x1 + x2 = (4, 2) without it and
    x1 + x2 = (3, 2) with it; d sum(keys)/d x0 = W = (1, 1) without it and (0, 0) with it."""
    to_k = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        to_k.weight.copy_(torch.tensor([[1.0, 1.0]]))
    model = torch.nn.ModuleDict({"attn2": torch.nn.ModuleDict({"to_k": to_k})})
    expected = {False: ([4.0, 2.0], [1.0, 1.0]), True: ([3.0, 2.0], [0.0, 0.0])}
    for stop, (weight_grad, first_grad) in expected.items():
        hooks = dc.stop_start_token_gradient(model) if stop else []
        assert len(hooks) == int(stop)
        context = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]]], requires_grad=True)
        keys = model["attn2"]["to_k"](context)
        assert keys.flatten().tolist() == [1.0, 2.0, 3.0]
        keys.sum().backward()
        assert to_k.weight.grad.flatten().tolist() == weight_grad
        assert context.grad[0, 0].tolist() == first_grad and context.grad[0, 1].tolist() == [1.0, 1.0]
        to_k.weight.grad = None
        for hook in hooks:
            hook.remove()


def test_start_token_gradient_stop_on_the_unet(toy):
    """On the miniature U-Net: the same output with the stop, no gradient to the context's position 0 (it
    reaches the U-Net only through attn2.to_k/to_v), and some gradient with --sot_gradient."""
    unet = common.trainable_copy(toy.unet, lambda n: "attn2.to_k" in n or "attn2.to_v" in n)
    gen = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    z_t = torch.randn(2, unet.config.in_channels, size, size, generator=gen)
    t = torch.tensor([100, 700])
    context = common.encode(toy, ["a red circle", "a blue square"]).detach()
    outputs, first_grads = {}, {}
    for stop in (False, True):
        hooks = dc.stop_start_token_gradient(unet) if stop else []
        assert len(hooks) == (2 * sum(n.endswith("attn2") for n, _ in unet.named_modules()) if stop else 0)
        ctx = context.clone().requires_grad_(True)
        out = unet(z_t, t, encoder_hidden_states=ctx).sample
        (out * torch.randn(out.shape, generator=gen)).sum().backward()
        outputs[stop], first_grads[stop] = out.detach(), ctx.grad[:, 0].abs().max().item()
        for hook in hooks:
            hook.remove()
    assert torch.equal(outputs[True], outputs[False])
    assert first_grads[True] == 0.0 and first_grads[False] > 0
