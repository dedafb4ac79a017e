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
    args = toy_args(samples=3, attack_steps=3, pgd_radius=0.05)
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


def test_toy_end_to_end_two_rounds(tmp_path):
    out = tmp_path / "erased"
    sgrace.main(["--model", "toy", "--concept", "red", "--device", "cpu", "--rounds", "2", "--attack_steps", "2",
                 "--erase_steps", "2", "--output", str(out)])
    assert {p.name for p in out.iterdir()} == {"erased.safetensors", "config.json", "samples.png"}
    tensors = load_file(out / "erased.safetensors")
    assert tensors and all(k.startswith("text_encoder.") and sgrace.trainable(k.split(".", 1)[1]) for k in tensors)
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "sgrace" and config["args"]["concept"] == "red" and config["attack_seconds"] > 0
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


def test_sd_interface_one_round(sd_like_path, tmp_path):
    """One round on the tiny SD-v1.4-interface model (77 tokens, 768-d), the AdvUnlearn-style options."""
    out = tmp_path / "erased"
    sgrace.main(["--model", str(sd_like_path), "--concept", "church", "--device", "cpu", "--projection", "none",
                 "--rounds", "1", "--attack_steps", "1", "--erase_steps", "1", "--samples", "2", "--output", str(out)])
    tensors = load_file(out / "erased.safetensors")
    assert tensors and all(k.startswith("text_encoder.") for k in tensors)
    config = json.loads((out / "config.json").read_text())
    assert config["prompt"] == "a photo of church" and config["settings"]["max_words"] == 20
    out_esd = tmp_path / "esd"
    sgrace.main(["--model", str(sd_like_path), "--concept", "church", "--device", "cpu", "--projection", "none",
                 "--rounds", "1", "--attack_steps", "1", "--erase_steps", "1", "--samples", "1", "--init", "target",
                 "--random_ids", "1", "--semantic_weight", "0", "--erase_loss", "esd", "--output", str(out_esd)])
    assert load_file(out_esd / "erased.safetensors")


def test_random_ids_never_draw_held_out_words(toy):
    """The generality test's held-out words must not leak into training through the random prefix ids."""
    banned = frozenset(common.tokenize(toy, ["orb round disk"])[0].tolist()) - set(toy.tokenizer.all_special_ids)
    assert banned
    for _ in range(50):
        ids, last = sgrace.sample_ids(toy, ["circle"], n_random=5, separator=" ", banned=banned)
        assert not set(ids[1:6].tolist()) & banned
