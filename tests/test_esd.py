"""Oracle tests for esd.py (ESD), and end-to-end runs on the miniature and SD-interface models."""
import json

import pytest
import torch
from safetensors.torch import load_file

import common
import esd


def group(unet, train_method) -> set[str]:
    in_group = esd.esd_parameter_group(train_method, unet)
    return {f"unet.{n}" for n, _ in unet.named_parameters() if in_group(n)}


def test_esd_target_by_hand():
    """Eq. 2 on fixed numbers: eps_a - eta (eps_c - eps_a); eta = 0 gives the anchor, eta = -1 the concept."""
    eps_anchor = torch.tensor([[1.0, 2.0], [0.0, -0.5]])
    eps_concept = torch.tensor([[3.0, -1.0], [0.5, -0.5]])
    expected = torch.tensor([[1 - 2 * (3 - 1), 2 - 2 * (-1 - 2)], [0 - 2 * 0.5, -0.5 - 0.0]])  # eta = 2
    assert torch.equal(esd.esd_target(eps_anchor, eps_concept, 2.0), expected)
    assert torch.equal(esd.esd_target(eps_anchor, eps_concept, 0.0), eps_anchor)
    assert torch.equal(esd.esd_target(eps_anchor, eps_concept, -1.0), eps_concept)
    # Eq. 3: the mean of the squared differences, here (1 + 4 + 0 + 1) / 4
    assert float(esd.esd_loss(expected + torch.tensor([[1.0, -2.0], [0.0, 1.0]]), expected)) == 1.5


def test_new_official_target_with_eta_2_is_the_paper_target_with_eta_1():
    """The new code's target eps_c - eta'(eps_c - eps_u) equals ours with eta = eta' - 1 (docs/esd.md)."""
    gen = torch.Generator().manual_seed(0)
    eps_u, eps_c = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    torch.testing.assert_close(eps_c - 2.0 * (eps_c - eps_u), esd.esd_target(eps_u, eps_c, 1.0))


@pytest.mark.parametrize("model", ["toy", "sd_like"])
def test_parameter_groups(model, request):
    """xattn = every attn2 tensor; noxattn = the rest minus time embedding and output layers; full = all."""
    unet = request.getfixturevalue(model).unet
    names = {f"unet.{n}" for n, _ in unet.named_parameters()}
    x, u, full = group(unet, "xattn"), group(unet, "noxattn"), group(unet, "full")
    assert full == names and x and u and not (x & u)
    assert x == {n for n in names if ".attn2." in n}
    assert {n.split("attn2.")[1].split(".")[0] for n in x} == {"to_q", "to_k", "to_v", "to_out"}
    left_out = names - x - u
    assert left_out == {n for n in names if n.startswith(("unet.time_embedding.", "unet.conv_norm_out.", "unet.conv_out."))}
    assert "unet.conv_in.weight" in u and any("time_emb_proj" in n for n in u)  # resnets' time projections stay
    with pytest.raises(SystemExit, match="train_method"):
        esd.esd_parameter_group("selfattn")


def test_the_new_official_groups(sd_like):
    """esd_sd.py's groups, by module: weights and biases of Linear / Conv2d layers, never a norm. Expected sets
    written from the module types by hand: SD's to_k / to_v have no bias, so esd-x-strict is 2 x 16 weights."""
    unet = sd_like.unet
    names = {f"unet.{n}" for n, _ in unet.named_parameters()}
    norms = {n for n in names if "norm" in n.split(".")[-2]}
    x, u, everything = group(unet, "esd-x"), group(unet, "esd-u"), group(unet, "esd-all")
    strict = group(unet, "esd-x-strict")
    assert strict == {n for n in names if n.endswith((".attn2.to_k.weight", ".attn2.to_v.weight"))} and len(strict) == 32
    assert x == group(unet, "xattn") - norms and not (x & u) and everything == x | u == names - norms
    assert {"unet.time_embedding.linear_1.bias", "unet.conv_in.bias", "unet.conv_out.weight"} <= u  # paper-era: left out
    assert not u & norms and u - group(unet, "noxattn") == {n for n in names - norms if n.startswith(
        ("unet.time_embedding.", "unet.conv_out."))}


def test_pndm_sampler_is_the_pipelines_schedule(sd_like):
    """--sampler pndm: SD v1.4's PLMS schedule repeats its second timestep, so t runs 981, 961, 961, 941 where
    DDIM's runs 981, 961, 941, 921; with no step taken x_t is the initial noise."""
    cond, uncond = common.encode(sd_like, ["a church"]), common.encode(sd_like, [""])
    ts = [esd.sample_until_pndm(sd_like, cond, uncond, [0], 50, k, 3.0)[1] for k in range(4)]
    ddim = [common.sample_until(sd_like, cond, uncond, [0], 50, k, 3.0)[1] for k in range(4)]
    assert ts == [981, 961, 961, 941] and ddim == [981, 961, 941, 921]
    x0, _ = esd.sample_until_pndm(sd_like, cond, uncond, [7], 50, 0, 3.0)
    assert torch.equal(x0, common.initial_latents(sd_like, [7]))
    x1, _ = esd.sample_until_pndm(sd_like, cond, uncond, [7], 50, 1, 3.0)
    assert not torch.equal(x1, x0) and torch.isfinite(x1).all()


def test_default_train_method_follows_the_paper():
    assert esd.default_train_method(common.concept_info("van gogh", "sd")) == "xattn"
    assert esd.default_train_method(common.concept_info("nudity", "sd")) == "noxattn"
    assert esd.default_train_method(common.concept_info("church", "sd")) == "noxattn"
    assert esd.default_train_method(common.concept_info("red", "toy")) == "xattn"
    assert esd.default_train_method(common.concept_info("circle", "toy")) == "noxattn"


TINY = ["--ddim_steps", "3", "--batch_size", "1", "--samples", "a circle"]


@pytest.mark.parametrize("train_method", ["xattn", "noxattn"])
def test_toy_two_iterations_change_only_the_chosen_group(tmp_path, toy, train_method):
    out = tmp_path / f"esd-{train_method}"
    extra = ["--sample_from_trained"] if train_method == "xattn" else []
    esd.main(["--model", "toy", "--concept", "circle", "--iterations", "2", "--train_method", train_method,
              "--output", str(out), *TINY, *extra])
    keys = set(load_file(out / "erased.safetensors"))
    assert keys == group(toy.unet, train_method)  # every trained tensor moved, nothing else did
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "esd" and config["train_method"] == train_method and config["args"]["iterations"] == 2
    assert config["args"]["lr"] == esd.TOY_DEFAULTS["lr"] and config["words"] == ["circle", "disc", "round shape"]
    assert (out / "samples.png").exists()
    common.load_pipeline("toy", erased=out, device="cpu")


def test_loop_trains_towards_the_target(toy, monkeypatch):
    """The loss the loop minimises is Eq. 3 against Eq. 2 computed with the frozen model on the same x_t:
    record the loop's inputs and recompute the first step's loss independently."""
    seen = {}
    real_target, real_loss = esd.esd_target, esd.esd_loss

    def spy_target(eps_anchor, eps_concept, eta):
        seen.setdefault("target", (eps_anchor.clone(), eps_concept.clone(), eta))
        return real_target(eps_anchor, eps_concept, eta)

    def spy_loss(eps_trained, eps_target):
        seen.setdefault("loss", (eps_trained.detach().clone(), eps_target.clone()))
        return real_loss(eps_trained, eps_target)

    monkeypatch.setattr(esd, "esd_target", spy_target)
    monkeypatch.setattr(esd, "esd_loss", spy_loss)
    monkeypatch.setattr(common, "save_erased", lambda *a, **k: "not written")
    monkeypatch.setattr(common, "before_after", lambda *a, **k: None)
    esd.main(["--model", "toy", "--concept", "red", "--iterations", "1", "--negative_guidance", "1.5",
              "--anchor", "gray", *TINY])
    eps_anchor, eps_concept, eta = seen["target"]
    eps_trained, eps_target = seen["loss"]
    assert eta == 1.5 and not torch.equal(eps_anchor, eps_concept)
    torch.testing.assert_close(eps_target, eps_anchor - 1.5 * (eps_concept - eps_anchor))
    # before the first step the trained copy is the original: its prediction is the frozen eps_c
    torch.testing.assert_close(eps_trained, eps_concept)


def test_nan_loss_stops_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(esd, "esd_loss", lambda *_: torch.tensor(float("nan"), requires_grad=True))
    out = tmp_path / "nan"
    with pytest.raises(SystemExit, match="NaN"):
        esd.main(["--model", "toy", "--concept", "red", "--iterations", "1", "--output", str(out), *TINY])
    assert not out.exists()


def test_sd_interface_one_iteration(sd_like_path, tmp_path):
    """One step on the SD-v1.4-interface model with the SD defaults (ESD-u for an object, lr 1e-5, eta 1)."""
    out = tmp_path / "esd-church"
    esd.main(["--model", str(sd_like_path), "--concept", "church", "--iterations", "1", "--ddim_steps", "2",
              "--samples", "a church", "--output", str(out), "--device", "cpu"])
    unet = common.load_pipeline(str(sd_like_path), device="cpu").unet
    keys = set(load_file(out / "erased.safetensors"))
    assert keys and keys <= group(unet, "noxattn")
    config = json.loads((out / "config.json").read_text())
    assert config["train_method"] == "noxattn" and config["args"]["lr"] == 1e-5
    assert config["args"]["negative_guidance"] == 1.0 and config["args"]["start_guidance"] == 3.0


def test_adam_in_backward_is_the_same_update(sd_like):
    """Three ESD-u steps with one Adam per parameter stepped inside the backward pass give the same weights as one
    Adam over all parameters (oracle: the plain loop), and no gradient is left behind."""
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context, target = common.encode(sd_like, ["a church", "a tree"]), torch.randn(2, 4, 8, 8)
    trained = []
    for fused in (False, True):
        unet = common.trainable_copy(sd_like.unet, esd.esd_parameter_group("noxattn"))
        params = [p for p in unet.parameters() if p.requires_grad]
        optimizers = esd.adam_in_backward(params, 1e-3) if fused else [torch.optim.Adam(params, lr=1e-3)]
        before = [p.detach().clone() for p in params]
        for _ in range(3):
            loss = esd.esd_loss(unet(z, 500, encoder_hidden_states=context).sample, target)
            if not fused:
                optimizers[0].zero_grad(set_to_none=True)
            loss.backward()
            if not fused:
                optimizers[0].step()
        assert not fused or all(p.grad is None for p in params)
        trained.append([p.detach().clone() for p in params])
    for plain, fused in zip(*trained):
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-7)
    assert sum(not torch.equal(p, q) for p, q in zip(trained[1], before)) > len(before) // 2  # training moved them


def test_optimizer_in_backward_refuses_fp16(capsys):
    with pytest.raises(SystemExit) as exc:
        esd.main(["--model", "toy", "--concept", "circle", "--optimizer_in_backward", "--mixed_precision", "fp16",
                  "--device", "cpu"])
    assert exc.value.code == 2
