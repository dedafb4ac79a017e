"""The erased-model format: the base is recognised by its fingerprint (not by how --model is spelled), every
tensor is checked before any is applied, a broken model folder says which file is missing, and an erased model
works with plain diffusers (an exported pipeline, and the README's few lines)."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import common
import uce

ROOT = Path(__file__).resolve().parents[1]
TIME_PROJ = "down_blocks.0.resnets.0.time_emb_proj.weight"  # a [32, 128] weight of the miniature U-Net


@pytest.fixture(scope="module")
def erased(tmp_path_factory):
    """UCE on a copy of the miniature model ('base/'), erased through that folder; and a copy of the copy with
    one of the tensors UCE changes perturbed ('other/'): other weights, the same architecture."""
    root = tmp_path_factory.mktemp("fingerprint")
    shutil.copytree(common.TOY_DIR, root / "base")
    uce.main(["--model", str(root / "base"), "--concept", "circle", "--kind", "object", "--output", str(root / "uce"),
              "--samples", "a circle", "--device", "cpu"])
    shutil.copytree(root / "base", root / "other")
    unet_file = root / "other" / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(unet_file)
    changed = next(k.split(".", 1)[1] for k in load_file(root / "uce" / "erased.safetensors"))
    weights[changed] = weights[changed] + 1e-3
    save_file(weights, unet_file)
    return root


def unet_state(pipe) -> dict:
    return {k: v.detach().clone() for k, v in pipe.unet.named_parameters()}


def test_config_records_the_base_fingerprint(erased):
    config = json.loads((erased / "uce" / "config.json").read_text())
    assert config["base_model"] == str(erased / "base")
    assert set(config["base_fingerprint"]["sha256"]) == {"float32", "float16", "bfloat16"}
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in config["base_fingerprint"]["sha256"].values())


def test_the_same_name_with_other_weights_says_the_model_changed(erased, tmp_path, capsys):
    """An erased model whose recorded base is the very folder given, whose weights have changed since: the
    refusal says so, instead of advising the same --model it was given."""
    shutil.copytree(erased / "uce", tmp_path / "uce")
    config = json.loads((tmp_path / "uce" / "config.json").read_text())
    (tmp_path / "uce" / "config.json").write_text(json.dumps(dict(config, base_model=str(erased / "other"))))
    other = common.load_pipeline(str(erased / "other"), device="cpu")
    with pytest.raises(SystemExit) as exc:
        common.load_erased(other, tmp_path / "uce")
    message = str(exc.value)
    assert "has changed since" in message and "pass --model" not in message.split(";")[0] and "\n" not in message


def test_the_same_weights_are_accepted_under_any_spelling(erased, monkeypatch):
    """Relative, ./relative, trailing slash, absolute, and the bundled original the copy was made from."""
    monkeypatch.chdir(erased)
    tensors = load_file(erased / "uce" / "erased.safetensors")
    for model in ["base", "./base", "base/", str(erased / "base"), "toy"]:
        pipe = common.load_pipeline(model, erased=erased / "uce", device="cpu")
        for key, value in tensors.items():
            assert torch.equal(common.named_part(pipe, key), value), (model, key)


def test_other_weights_are_refused_naming_both(erased, sd_like_path, capsys):
    """A copy with one changed tensor perturbed (same shapes: only the fingerprint tells), and a model of
    another architecture; both refused with one sentence naming both models, the pipeline left untouched."""
    other = common.load_pipeline(str(erased / "other"), device="cpu")
    before = unet_state(other)
    with pytest.raises(SystemExit) as exc:
        common.load_erased(other, erased / "uce")
    message = str(exc.value)
    assert exc.value.code == 2 and "\n" not in message and "holds other weights" in message
    assert f"erased from '{erased / 'base'}'" in message and f"'{erased / 'other'}'" in message
    assert all(torch.equal(v, before[k]) for k, v in unet_state(other).items())
    assert capsys.readouterr().err.strip().splitlines()[-1] == message

    with pytest.raises(SystemExit) as exc:
        common.load_pipeline(str(sd_like_path), erased=erased / "uce", device="cpu")
    assert f"erased from '{erased / 'base'}'" in str(exc.value) and str(sd_like_path) in str(exc.value)


def write_erased(folder: Path, tensors: dict, config: dict):
    folder.mkdir()
    save_file(tensors, folder / "erased.safetensors")
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("key, value, words", [
    (f"unet.{TIME_PROJ}", torch.zeros(32, 1), "shape [32, 1]"),  # broadcastable: would fill every column
    (f"unet.{TIME_PROJ}", torch.zeros(128, 32), "shape [128, 32]"),
    (f"vae.{TIME_PROJ}", torch.zeros(32, 128), "does not start with 'unet.' or 'text_encoder.'"),
    (TIME_PROJ, torch.zeros(32, 128), "does not start with 'unet.' or 'text_encoder.'"),
    ("unet.down_blocks.0.no_such_layer.weight", torch.zeros(32, 128), "names no parameter"),
    (f"unet.{TIME_PROJ}", torch.zeros(32, 128, dtype=torch.int32), "floating point"),
])
def test_every_tensor_is_checked_before_any_is_applied(tmp_path, toy, key, value, words):
    """A valid tensor next to a bad one: one sentence, and not even the valid one is applied."""
    good_key = "unet.up_blocks.1.resnets.0.time_emb_proj.weight"
    config = {"format": common.FORMAT, "method": "m", "base_model": "toy", "base_fingerprint": {
        "sha256": common.base_fingerprint(toy, [good_key]), "covers": common.FINGERPRINT_COVERS}}
    write_erased(tmp_path / "bad", {good_key: torch.ones(32, 128), key: value}, config)
    before = unet_state(toy)
    with pytest.raises(SystemExit) as exc:
        common.load_erased(toy, tmp_path / "bad")
    assert exc.value.code == 2 and words in str(exc.value) and "\n" not in str(exc.value)
    assert all(torch.equal(v, before[k]) for k, v in unet_state(toy).items())


def test_a_folder_without_fingerprint_falls_back_to_the_name_with_a_notice(tmp_path, toy, capsys):
    """Folders written before fingerprints: the --model names are compared (two spellings of one folder are
    the same name), after a one-line notice."""
    key = f"unet.{TIME_PROJ}"
    write_erased(tmp_path / "old", {key: torch.ones(32, 128)}, {"format": common.FORMAT, "method": "m",
                                                                 "base_model": "toy"})
    common.load_erased(toy, tmp_path / "old")
    assert torch.equal(common.named_part(toy, key), torch.ones(32, 128))
    notice = capsys.readouterr().err.strip().splitlines()
    assert len(notice) == 1 and notice[0].startswith("note:") and "no fingerprint" in notice[0]
    toy.base_model = "elsewhere/sd"
    with pytest.raises(SystemExit, match="erased from 'toy', not from 'elsewhere/sd'"):
        common.load_erased(toy, tmp_path / "old")
    assert common.same_model_name(str(tmp_path), f"{tmp_path}/") and not common.same_model_name("toy", "other")


def test_a_missing_weight_file_is_named(tmp_path):
    shutil.copytree(common.TOY_DIR, tmp_path / "sd")
    (tmp_path / "sd" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(SystemExit) as exc:
        common.load_pipeline(str(tmp_path / "sd"), device="cpu")
    assert "unet/diffusion_pytorch_model.safetensors" in str(exc.value) and "network" not in str(exc.value)
    with pytest.raises(SystemExit, match="unet/diffusion_pytorch_model.safetensors"):  # uce stops before loading
        uce.main(["--model", str(tmp_path / "sd"), "--concept", "church"])
    shutil.copy(common.TOY_DIR / "unet" / "diffusion_pytorch_model.safetensors", tmp_path / "sd" / "unet")
    shutil.rmtree(tmp_path / "sd" / "tokenizer")
    with pytest.raises(SystemExit, match="tokenizer/"):
        common.load_pipeline(str(tmp_path / "sd"), device="cpu")


def readme_snippet() -> str:
    """The README's lines that apply erased.safetensors with plain diffusers."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return next(b for b in blocks if "load_file" in b)


def plain_images(pipe, prompts, seeds):
    """Images from a diffusers pipeline's own __call__, one CPU generator per seed, 2 DDIM steps, guidance 3."""
    out = pipe(prompts, num_inference_steps=2, guidance_scale=3.0, output_type="np",
               generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    return (out * 255).round().astype(np.int16)


def test_export_and_readme_lines_give_the_images_of_load_pipeline(erased, tmp_path):
    """`python common.py export` writes a pipeline that diffusers loads alone; the README's lines apply the
    erased tensors onto a plain pipeline; both draw the same images as common.load_pipeline(base, erased=...)."""
    from diffusers import StableDiffusionPipeline

    prompts, seeds = ["a red circle", "a blue square"], [0, 1]
    ours = common.generate(common.load_pipeline("toy", erased=erased / "uce", device="cpu"), prompts, seeds,
                           steps=2, guidance=3.0, progress=False)
    ours = np.stack([np.asarray(im, dtype=np.int16) for im in ours])

    common.main(["export", "--erased", str(erased / "uce"), "--output", str(tmp_path / "exported")])
    assert {p.name for p in (tmp_path / "exported").iterdir()} >= {"model_index.json", "unet", "text_encoder", "vae",
                                                                    "tokenizer", "scheduler", "erasure.json"}
    assert list((tmp_path / "exported" / "unet").glob("*.safetensors"))
    exported = StableDiffusionPipeline.from_pretrained(tmp_path / "exported")
    assert np.abs(plain_images(exported, prompts, seeds) - ours).max() <= 1  # float rounding of the decode

    code = readme_snippet()
    code = re.sub(r"base, erased = .*\n", f"base, erased = {str(erased / 'base')!r}, {str(erased / 'uce')!r}\n", code)
    namespace = {}
    exec(code.split("image = ")[0], namespace)  # everything but the final 50-step picture
    assert np.abs(plain_images(namespace["pipe"], prompts, seeds) - ours).max() <= 1


def test_export_refuses_to_overwrite_what_it_did_not_write(erased, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    for output in [tmp_path / "mine", erased / "uce" / "inside", erased / "base"]:
        with pytest.raises(SystemExit) as exc:
            common.main(["export", "--erased", str(erased / "uce"), "--output", str(output)])
        assert exc.value.code == 2
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep" and not (erased / "uce" / "inside").exists()
