"""Oracle tests for sage.py (SAGE, a reconstruction), and end-to-end runs on the miniature and SD-interface models."""
import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

import common
import sage


def transformer_names(text_encoder) -> set[str]:
    return {f"text_encoder.{n}" for n, _ in text_encoder.named_parameters() if sage.transformer_weights(n)}


def concept_sample(pipe, word):
    """The soft prompt emb(word) [1, L, D] and its end-of-text position."""
    ids = common.tokenize(pipe, [word])
    return sage.token_embeddings(pipe.text_encoder, ids), common.eos_index(pipe, ids)


def perturbed(text_encoder, scale: float, seed: int = 0):
    """A copy of the encoder with Gaussian noise (relative to each tensor's scale) on its transformer weights."""
    gen = torch.Generator().manual_seed(seed)
    clone = copy.deepcopy(text_encoder)
    with torch.no_grad():
        for name, p in clone.named_parameters():
            if sage.transformer_weights(name) and p.ndim == 2:
                p.add_(scale * p.std() * torch.randn(p.shape, generator=gen))
    return clone


def test_negative_guidance_target_by_hand():
    """Eq. 4 on fixed numbers: e_0 - eta (e_p - e_0); eta = 0 gives e_0, eta = -1 gives e_p."""
    eps_uncond = torch.tensor([[1.0, 2.0], [0.0, -0.5]])
    eps_concept = torch.tensor([[3.0, -1.0], [0.5, -0.5]])
    expected = torch.tensor([[1 - (3 - 1), 2 - (-1 - 2)], [0 - 0.5, -0.5 - 0.0]])  # eta = 1: 2 e_0 - e_p
    assert torch.equal(sage.negative_guidance_target(eps_uncond, eps_concept, 1.0), expected)
    assert torch.equal(sage.negative_guidance_target(eps_uncond, eps_concept, 0.0), eps_uncond)
    assert torch.equal(sage.negative_guidance_target(eps_uncond, eps_concept, -1.0), eps_concept)
    # Eq. 5: the mean of the squared differences, here (1 + 4 + 0 + 1) / 4
    assert float(sage.self_erasure_loss(expected + torch.tensor([[1.0, -2.0], [0.0, 1.0]]), expected)) == 1.5


def test_global_retention_loss_by_hand():
    """Eq. 6 on 2-d features: S_0 = I; trained features (1,0), (1,1) give S off-diagonal 1/sqrt(2), so the
    mean squared difference is 2 (1/2) / 4 = 1/4. The concept option adds the mean squared change of cos(., c)."""
    original = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    trained = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(sage.similarity_matrix(trained), torch.tensor([[1.0, 0.5**0.5], [0.5**0.5, 1.0]]))
    assert math.isclose(float(sage.global_retention_loss(trained, original)), 0.25, rel_tol=1e-6)
    concept = torch.tensor([0.0, 1.0])  # cos to c: original (0, 1), trained (0, 1/sqrt 2)
    expected = 0.25 + (1 - 0.5**0.5) ** 2 / 2
    assert math.isclose(float(sage.global_retention_loss(trained, original, concept)), expected, rel_tol=1e-6)


def test_global_retention_loss_zero_for_identical_encoders_positive_after_perturbation(toy):
    words = ["red", "square", "star", "blue", "photo", "background"]
    original = common.pooled_features(toy, words, toy.text_encoder, "eot")
    same = common.pooled_features(toy, words, copy.deepcopy(toy.text_encoder), "eot")
    assert float(sage.global_retention_loss(same, original)) == 0.0
    moved = common.pooled_features(toy, words, perturbed(toy.text_encoder, 0.5), "eot")
    assert float(sage.global_retention_loss(moved, original)) > 1e-4


def test_self_check_accepts_the_concept_and_rejects_another(toy):
    """Eq. 2: the training encoder (here = the original) maps emb('circle') onto pool(E_0('circle')): accepted
    (similarity 1); emb('square') is mapped elsewhere: rejected. A training encoder that no longer maps
    emb('circle') onto the concept rejects it too."""
    feature = common.pooled_features(toy, ["circle"], toy.text_encoder, "eot")
    circle, eos = concept_sample(toy, "circle")
    square, _ = concept_sample(toy, "square")
    trained = copy.deepcopy(toy.text_encoder)
    ok, similarity = sage.self_check(trained, circle, eos, feature, 0.9, "eot")
    assert ok and similarity == pytest.approx(1.0, abs=1e-5)
    ok, similarity = sage.self_check(trained, square, eos, feature, 0.9, "eot")
    assert not ok and similarity < 0.9
    ok, similarity = sage.self_check(perturbed(toy.text_encoder, 3.0), circle, eos, feature, 0.9, "eot")
    assert not ok and similarity < 0.9


def test_boundary_search_moves_away_inside_the_ball(toy):
    """Eq. 1: only the concept's tokens move, each stays within delta ||e_i|| of e_i, and the push term
    takes the sample away from e while it stays in the concept domain of a not-yet-erased encoder."""
    feature = common.pooled_features(toy, ["round shape"], toy.text_encoder, "eot")
    embeds, eos = concept_sample(toy, "round shape")
    content = torch.zeros(embeds.shape[1], dtype=torch.bool)
    content[1:int(eos)] = True
    sample = sage.boundary_search(toy.text_encoder, embeds, embeds, content, eos, feature, beta=1.0, delta=0.5,
                                  steps=8, step_size=0.3, init_noise=0.25, pooling="eot",
                                  generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample[:, ~content], embeds[:, ~content])
    offset = (sample - embeds)[0, content].norm(dim=-1)
    assert (offset <= 0.5 * embeds[0, content].norm(dim=-1) * (1 + 1e-5)).all() and (offset > 0).all()
    away = torch.nn.functional.cosine_similarity(sample[0, content].flatten(), embeds[0, content].flatten(), dim=0)
    assert away < 0.99
    ok, _ = sage.self_check(toy.text_encoder, sample, eos, feature, 0.5, "eot")
    assert ok


def test_pooling(toy, sd_like):
    """'eot' is CLIP's pooled feature: the text model's own pooler_output (the oracle), on both tokenizers;
    'mean' averages the tokens up to and including end-of-text. SAGE pools with common.pool."""
    for pipe, prompts in [(toy, ["a red circle", "star"]), (sd_like, ["a photo of nudity", "Van Gogh"])]:
        ids = common.tokenize(pipe, prompts)
        with torch.no_grad():
            out = pipe.text_encoder(ids)
            eos = common.eos_index(pipe, ids)
            torch.testing.assert_close(common.pool(out[0], eos, "eot", pipe.text_encoder), out.pooler_output)
            torch.testing.assert_close(common.pooled_features(pipe, prompts), out.pooler_output)
            torch.testing.assert_close(common.pooled_features(pipe, prompts, pooling="mean")[1],
                                       out[0][1, :int(eos[1]) + 1].mean(0))
    assert int(common.eos_index(toy, common.tokenize(toy, ["star"]))[0]) == 2  # SOT star EOT: mean of 3 tokens
    assert not hasattr(sage, "pool") and not hasattr(sage, "pooled")  # one pooled-feature function, in common


def test_irrelevant_concepts_leave_out_the_concept_and_its_synonyms(toy, sd_like):
    """R_g: vocabulary words, without any piece of the concept's words and held-out words, and without the
    nearest fraction."""
    import random

    words, features = sage.irrelevant_concepts(toy, ["circle", "disc", "round shape"], ["orb", "round disk"], 2000,
                                               0.1, "eot", random.Random(0))
    vocabulary = sage.vocabulary_words(toy.tokenizer)
    assert "<|endoftext|>" not in vocabulary and "square" in vocabulary
    assert not {"circle", "disc", "round", "shape", "orb", "disk"} & set(words)
    assert len(words) == len(features) == (len(vocabulary) - 6) - int(0.1 * (len(vocabulary) - 6))
    torch.testing.assert_close(features, common.pooled_features(toy, words, toy.text_encoder, "eot"))
    sd_words = sage.vocabulary_words(sd_like.tokenizer)  # the real CLIP vocabulary: word-final '</w>' tokens
    assert {"church", "photo", "painting", "a"} <= set(sd_words) and 20_000 < len(sd_words) < 49_408
    assert all(w.isascii() and w.isalpha() for w in sd_words) and "<|endoftext|>" not in sd_words


def test_irrelevant_words_hold_no_piece_of_the_concept_on_the_real_tokenizer(sd_like, monkeypatch):
    """CLIP cuts 'nudity' into 'nu' + 'dity</w>', and 'dity</w>' ends a word, so vocabulary_words offers 'dity'.
    R_g, drawn here from the whole vocabulary (features stubbed: only the word filter is under test), holds no
    piece of the concept's words or its held-out words; every other vocabulary word stays."""
    import random

    assert sd_like.tokenizer.tokenize("nudity") == ["nu", "dity</w>"]
    vocabulary = set(sage.vocabulary_words(sd_like.tokenizer))
    assert {"dity", "topless", "naked", "clothes"} <= vocabulary
    concept, held_out = ["nudity", "nude", "naked"], ["without clothes", "topless"]
    pieces = {"nu", "dity", "nude", "naked", "without", "clothes", "topless"}
    assert sage.word_pieces(sd_like.tokenizer, concept + held_out) == pieces
    monkeypatch.setattr(common, "pooled_features", lambda pipe, prompts, *a, **k: torch.randn(len(prompts), 8))
    words, _ = sage.irrelevant_concepts(sd_like, concept, held_out, 10**6, 0.0, "eot", random.Random(0))
    assert not pieces & set(words)
    assert set(words) == vocabulary - pieces and len(words) == len(set(words))


def test_ablation_switches_parse():
    """common.parse_args makes --no_<flag> for booleans; argparse accepts the unambiguous --no_global / --no_local."""
    args = common.parse_args(sage.Args, ["--concept", "circle", "--no_self_check", "--no_global", "--no_local"])
    assert not (args.self_check or args.global_retention or args.local_retention)
    args = common.parse_args(sage.Args, ["--concept", "circle", "--model", "toy"], toy_defaults=sage.TOY_DEFAULTS)
    assert args.self_check and args.global_retention and args.local_retention and args.lr == sage.TOY_DEFAULTS["lr"]


TINY = ["--ddim_steps", "3", "--warm_up", "0", "--global_batch", "8", "--local_batch", "1", "--samples", "a circle"]


@pytest.mark.parametrize("switches", [[], ["--no_self_check", "--no_global_retention", "--no_local_retention"]])
def test_toy_two_iterations_change_only_transformer_weights(tmp_path, toy, monkeypatch, switches):
    """Only the text encoder's transformer weights change; its token/position embeddings and the U-Net are
    bit-identical after the run (the pipeline the run loaded is inspected afterwards)."""
    loaded = {}
    real_load = common.load_pipeline

    def load(*a, **k):
        loaded["pipe"] = real_load(*a, **k)
        loaded["before"] = {k: v.clone() for k, v in [*loaded["pipe"].unet.state_dict().items(),
                                                       *loaded["pipe"].text_encoder.state_dict().items()]}
        return loaded["pipe"]

    monkeypatch.setattr(common, "load_pipeline", load)
    out = tmp_path / "sage-circle"
    sage.main(["--model", "toy", "--concept", "circle", "--iterations", "2", "--output", str(out), *TINY, *switches])
    tensors = load_file(out / "erased.safetensors")
    assert set(tensors) == transformer_names(toy.text_encoder)  # every trained tensor moved, nothing else
    pipe = loaded["pipe"]
    after = {**pipe.unet.state_dict(), **pipe.text_encoder.state_dict()}
    assert all(torch.equal(after[k], v) for k, v in loaded["before"].items())  # the frozen originals
    erased = real_load("toy", erased=out, device="cpu")
    for name, p in erased.text_encoder.named_parameters():
        same = torch.equal(p, dict(toy.text_encoder.named_parameters())[name])
        assert same == (not sage.transformer_weights(name)), name
    for (name, p), q in zip(erased.unet.named_parameters(), toy.unet.parameters()):
        assert torch.equal(p, q), name
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "sage" and config["args"]["iterations"] == 2
    assert config["args"]["lr"] == sage.TOY_DEFAULTS["lr"] and config["words"] == ["circle", "disc", "round shape"]
    assert config["searches"] == (0 if switches else 2) and config["irrelevant_concepts"] == (0 if switches else 99)
    assert (out / "samples.png").exists()


def test_first_step_erases_towards_the_esd_target(toy, monkeypatch):
    """At the first step E_theta = E_0, so the trained prediction for the word (through common.text_forward)
    is the frozen e_p, and the target is 2 e_0 - e_p for eta = 1."""
    seen = {}
    real_target, real_loss = sage.negative_guidance_target, sage.self_erasure_loss

    def spy_target(eps_uncond, eps_concept, eta):
        seen.setdefault("target", (eps_uncond.clone(), eps_concept.clone(), eta))
        return real_target(eps_uncond, eps_concept, eta)

    def spy_loss(eps_trained, eps_target):
        seen.setdefault("loss", (eps_trained.detach().clone(), eps_target.clone()))
        return real_loss(eps_trained, eps_target)

    monkeypatch.setattr(sage, "negative_guidance_target", spy_target)
    monkeypatch.setattr(sage, "self_erasure_loss", spy_loss)
    monkeypatch.setattr(common, "save_erased", lambda *a, **k: "not written")
    monkeypatch.setattr(common, "before_after", lambda *a, **k: None)
    sage.main(["--model", "toy", "--concept", "red", "--iterations", "1", *TINY])
    eps_uncond, eps_concept, eta = seen["target"]
    eps_trained, eps_target = seen["loss"]
    assert eta == 1.0 and not torch.equal(eps_uncond, eps_concept)
    torch.testing.assert_close(eps_target[:1], 2 * eps_uncond - eps_concept)
    torch.testing.assert_close(eps_trained[:1], eps_concept, rtol=1e-4, atol=1e-5)
    assert len(eps_trained) == 2  # the word and the boundary sample accepted by the first self-check


def test_nan_loss_stops_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(sage, "self_erasure_loss", lambda *_: torch.tensor(float("nan"), requires_grad=True))
    out = tmp_path / "nan"
    with pytest.raises(SystemExit, match="NaN"):
        sage.main(["--model", "toy", "--concept", "red", "--iterations", "1", "--output", str(out), *TINY])
    assert not out.exists()


def test_unknown_concept_is_one_sentence():
    with pytest.raises(SystemExit) as error:
        sage.main(["--model", "toy", "--concept", "hexagon"])
    message = str(error.value)
    assert message.startswith("error: unknown concept 'hexagon'") and "\n" not in message


def test_sd_interface_one_iteration(sd_like_path, tmp_path):
    """One step on the SD-v1.4-interface model with the SD defaults (lr 1e-5, eta 1, guidance 3)."""
    out = tmp_path / "sage-church"
    sage.main(["--model", str(sd_like_path), "--concept", "church", "--iterations", "1", "--ddim_steps", "2",
               "--warm_up", "0", "--samples", "a church", "--output", str(out), "--device", "cpu"])
    text_encoder = common.load_pipeline(str(sd_like_path), device="cpu").text_encoder
    keys = set(load_file(out / "erased.safetensors"))
    assert keys and keys <= transformer_names(text_encoder)
    config = json.loads((out / "config.json").read_text())
    assert config["args"]["lr"] == 1e-5 and config["args"]["negative_guidance"] == 1.0
    assert config["args"]["start_guidance"] == 3.0 and config["searches"] == 1
