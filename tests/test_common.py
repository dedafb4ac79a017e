"""Oracle tests for common.py, on the miniature model and on the tiny SD-v1.4-interface model."""
import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import common


def test_sd_like_interface(sd_like):
    """The test model has SD v1.4's interface, and common.py samples from it."""
    assert sd_like.tokenizer.model_max_length == 77
    context = common.encode(sd_like, ["a photo of a church"])
    assert context.shape == (1, 77, 768)
    assert sd_like.unet.config.in_channels == 4
    assert len(common.attn2_projections(sd_like.unet, ("to_k",))) == 16
    assert len(common.attn2_projections(sd_like.unet)) == 32
    images = common.generate(sd_like, ["a church", "a tree"], [0, 1], steps=3, guidance=7.5, progress=False)
    assert [im.size for im in images] == [(64, 64), (64, 64)]


@pytest.mark.parametrize("which", ["toy", "sd_like"])
def test_sample_until_matches_diffusers_pipeline(which, request):
    """x_t after k DDIM steps equals the latent diffusers' own pipeline holds after step k."""
    pipe = request.getfixturevalue(which)
    steps, k, guidance, prompt = 6, 3, 3.0, "a red circle"
    cond, uncond = common.encode(pipe, [prompt]), common.encode(pipe, [""])
    with torch.no_grad():
        z_t, t = common.sample_until(pipe, cond, uncond, [7], steps, k, guidance)
    seen = {}

    def grab(_pipe, i, timestep, kwargs):
        seen[i] = kwargs["latents"].clone()
        return kwargs

    pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, latents=common.initial_latents(pipe, [7]),
         output_type="latent", callback_on_step_end=grab, callback_on_step_end_tensor_inputs=["latents"])
    torch.testing.assert_close(z_t, seen[k - 1], rtol=1e-4, atol=1e-5)
    pipe.scheduler.set_timesteps(steps)
    assert t == int(pipe.scheduler.timesteps[k])


def test_guidance_one_is_the_conditional_prediction(toy):
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond, uncond = common.encode(toy, ["a red circle", "a blue star"]), common.encode(toy, ["", ""])
    with torch.no_grad():
        guided = common.predict_noise(toy.unet, latents, 500, cond, uncond, guidance=1.0)
        plain = toy.unet(latents, 500, encoder_hidden_states=cond).sample
        strong = common.predict_noise(toy.unet, latents, 500, cond, uncond, guidance=5.0)
    torch.testing.assert_close(guided, plain, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(strong, plain, atol=1e-3)


def test_text_forward_on_embeddings_equals_ids(toy, sd_like):
    for pipe in (toy, sd_like):
        ids = common.tokenize(pipe, ["a small red circle", "a star"])
        embeds = pipe.text_encoder.get_input_embeddings()(ids)
        with torch.no_grad():
            torch.testing.assert_close(common.text_forward(pipe.text_encoder, embeds), pipe.text_encoder(ids)[0],
                                       rtol=1e-4, atol=1e-5)


def test_seeded_images_do_not_depend_on_the_batch(toy):
    alone = common.generate(toy, ["a red circle"], [3], steps=4, progress=False)[0]
    batched = common.generate(toy, ["a blue star", "a red circle"], [1, 3], steps=4, batch_size=2, progress=False)[1]
    # equal up to float rounding (a batch changes the order of the sums on a CPU)
    diff = torch.from_numpy(np.asarray(alone, dtype=np.int16) - np.asarray(batched, dtype=np.int16))
    assert diff.abs().max() <= 2


def test_erased_round_trip(tmp_path, toy):
    """Saving the changed tensors and loading them restores exactly those, and nothing else changes."""
    unet = copy.deepcopy(toy.unet)
    name, proj = common.attn2_projections(unet)[0]
    with torch.no_grad():
        proj.weight.add_(0.1)
    tensors = common.changed_tensors("unet", unet, toy.unet)
    assert list(tensors) == [f"unet.{name}.weight"]

    @dataclasses.dataclass
    class Args:
        concept: str = "circle"

    out = common.save_erased(tmp_path / "erased", tensors, "test", Args(), toy, 1.5)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "erased.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "test" and config["args"] == {"concept": "circle"} and config["seconds"] == 1.5
    assert config["base_model"] == "toy" and config["base_fingerprint"]["sha256"] == common.base_fingerprint(toy, tensors)
    assert set(load_file(out / "erased.safetensors")) == set(tensors)

    fresh = common.load_pipeline("toy", erased=out, device="cpu")
    original = common.load_pipeline("toy", device="cpu")
    changed = {k.split(".", 1)[1] for k in tensors}
    for part in ("unet", "text_encoder", "vae"):
        ours, base = dict(getattr(fresh, part).named_parameters()), dict(getattr(original, part).named_parameters())
        for key, value in ours.items():
            expected = tensors[f"unet.{key}"] if part == "unet" and key in changed else base[key]
            assert torch.equal(value, expected), (part, key)


def test_save_refuses_base_model_and_foreign_folders(tmp_path, sd_like_path):
    tensors = {"unet.x": torch.zeros(1)}
    with pytest.raises(SystemExit, match="base model"):
        common.save_erased(common.TOY_DIR, tensors, "m", {}, "toy", 0)
    with pytest.raises(SystemExit, match="base model"):
        common.save_erased(sd_like_path / "unet", tensors, "m", {}, str(sd_like_path), 0)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="not an erased model"):
        common.save_erased(foreign, tensors, "m", {}, "toy", 0)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_load_errors_are_one_sentence(tmp_path, toy):
    with pytest.raises(SystemExit, match="not a diffusers pipeline"):
        common.load_pipeline(str(tmp_path), device="cpu")
    with pytest.raises(SystemExit, match="--model /path/to/stable-diffusion-v1-4"):
        common.load_pipeline("nobody-here/no-such-model-xyz", device="cpu")
    with pytest.raises(SystemExit, match="not an erased model"):
        common.load_erased(toy, tmp_path)


def test_erased_model_from_another_base_is_refused(tmp_path, sd_like, toy):
    unet = copy.deepcopy(toy.unet)
    with torch.no_grad():
        common.attn2_projections(unet)[0][1].weight.add_(1)
    out = common.save_erased(tmp_path / "e", common.changed_tensors("unet", unet, toy.unet), "m", {}, "toy", 0)
    with pytest.raises(SystemExit, match="erased from 'toy'"):
        common.load_erased(sd_like, out)


def test_parse_args_help_toy_defaults_and_flags(capsys):
    @dataclasses.dataclass
    class Args:
        concept: str
        """the concept to erase"""
        model: str = "CompVis/stable-diffusion-v1-4"
        """which model"""
        iterations: int = 1000
        """training iterations"""
        self_check: bool = True
        """use the self-check"""
        words: list[str] = dataclasses.field(default_factory=lambda: ["a"])
        """some words"""

    toy = {"iterations": 50}
    args = common.parse_args(Args, ["--concept", "circle", "--model", "toy"], toy)
    assert (args.iterations, args.self_check, args.words) == (50, True, ["a"])
    args = common.parse_args(Args, ["--concept", "c", "--model", "toy", "--iterations", "7", "--no_self_check",
                                    "--words", "x", "y"], toy)
    assert (args.iterations, args.self_check, args.words) == (7, False, ["x", "y"])
    assert common.parse_args(Args, ["--concept", "c"], toy).iterations == 1000
    with pytest.raises(SystemExit):
        common.parse_args(Args, ["--help"], toy)
    assert "training iterations (default: 1000; toy: 50)" in " ".join(capsys.readouterr().out.split())


def test_set_trainable_and_attn2_names(toy):
    unet = common.trainable_copy(toy.unet, lambda n: "attn2.to_k" in n)
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all("attn2.to_k" in n for n in trainable)
    assert {f"{n}.weight" for n, _ in common.attn2_projections(unet, ("to_k",))} == set(trainable)
    assert not any(p.requires_grad for p in toy.unet.parameters())


def test_concept_info_toy_and_sd():
    world = json.loads(common.WORLD_FILE.read_text())
    info = common.concept_info("Circle", "toy")
    assert info["kind"] == "object" and info["words"][0] == "circle" and info["anchor"] == world["anchors"]["object"]
    assert not set(info["held_out"]) & set(info["words"])  # held-out words are never an erasure default
    assert "circle" not in info["others"] and info["anchor"] not in info["others"]
    assert common.concept_info("red", "toy")["kind"] == "colour"
    with pytest.raises(SystemExit, match="unknown concept 'dog'"):
        common.concept_info("dog", "toy")
    with pytest.raises(SystemExit, match="unknown concept"):
        common.concept_info("blob", "toy")  # the anchor itself is not a concept to erase
    assert common.concept_info("Van Gogh", common.SD14)["kind"] == "style"
    assert common.concept_info("a red balloon", common.SD14, kind="object")["words"] == ["a red balloon"]
    with pytest.raises(SystemExit, match="--kind"):
        common.concept_info("a red balloon", common.SD14)  # not built in, no kind: refused, not guessed


def test_save_erased_writes_extra_files_in_the_same_rename(tmp_path):
    out = common.save_erased(tmp_path / "e", {"unet.x": torch.ones(1)}, "m", {}, "toy", 0,
                             write_extra=lambda tmp: (tmp / "cache.txt").write_text("kept"))
    assert (out / "cache.txt").read_text() == "kept"
