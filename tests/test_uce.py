"""Oracle tests for uce.py (UCE), and end-to-end runs on the miniature and SD-interface models."""
import json

import pytest
import torch
from safetensors.torch import load_file

import common
import uce


def random_system(d_out=6, d_in=10, n=3, m=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(d_out, d_in, generator=gen), torch.randn(n, d_in, generator=gen),
            torch.randn(n, d_out, generator=gen), torch.randn(m, d_in, generator=gen))


def stacked_lstsq(W, keys, values, kept, s_p, reg, s_e):
    """Eq. 2 as one least-squares system A X = B in X = W*^T, solved in float64 by torch.linalg.lstsq:
    rows sqrt(s_e) k_i -> sqrt(s_e) v_i, sqrt(s_p) p_j -> sqrt(s_p) W p_j, sqrt(reg) e_k -> sqrt(reg) W e_k."""
    W, keys, values, kept = W.double(), keys.double(), values.double(), kept.double()
    eye = torch.eye(W.shape[1], dtype=torch.float64)
    A = torch.cat([s_e ** 0.5 * keys, s_p ** 0.5 * kept, reg ** 0.5 * eye])
    B = torch.cat([s_e ** 0.5 * values, s_p ** 0.5 * kept @ W.T, reg ** 0.5 * W.T])
    return torch.linalg.lstsq(A, B).solution.T


@pytest.mark.parametrize("s_e, s_p, reg, m", [(1.0, 1.0, 0.5, 4), (1.5, 0.7, 0.3, 4), (2.0, 1.0, 0.1, 0)])
def test_closed_form_equals_lstsq_on_the_stacked_system(s_e, s_p, reg, m):
    W, keys, values, kept = random_system(m=m)
    W_star = uce.closed_form_edit(W, keys, values, kept, s_p, reg, erase_scale=s_e)
    assert W_star.dtype == W.dtype and W_star.shape == W.shape
    torch.testing.assert_close(W_star.double(), stacked_lstsq(W, keys, values, kept, s_p, reg, s_e), rtol=1e-4, atol=1e-4)


def test_huge_preservation_weight_keeps_preserved_keys():
    """With s_p -> infinity the preserved keys' outputs do not move, while the erase keys still do."""
    W, keys, values, kept = random_system()
    W_star = uce.closed_form_edit(W, keys, values, kept, preserve_scale=1e6, lam=0.5)
    torch.testing.assert_close(kept @ W_star.T, kept @ W.T, rtol=1e-3, atol=1e-3)
    assert (keys @ W_star.T - values).norm() < 0.5 * (keys @ W.T - values).norm()


def test_interpolates_when_the_keys_are_few_and_the_pull_vanishes():
    """n + m <= d_in independent keys and reg -> 0: erase keys land exactly on their targets and
    preserved keys exactly on their old outputs (the defining property of the edit)."""
    W, keys, values, kept = random_system(n=3, m=4, d_in=10)
    W_star = uce.closed_form_edit(W, keys, values, kept, preserve_scale=1.0, lam=1e-6)
    torch.testing.assert_close(keys @ W_star.T, values, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(kept @ W_star.T, kept @ W.T, rtol=1e-3, atol=1e-3)


def test_nothing_to_erase_changes_nothing():
    W, keys, values, kept = random_system()
    torch.testing.assert_close(uce.closed_form_edit(W, keys, values, kept, 1.0, 0.5, erase_scale=0.0), W)
    torch.testing.assert_close(uce.closed_form_edit(W, keys, keys @ W.T, kept, 1.0, 0.5), W, rtol=1e-4, atol=1e-4)


def test_token_vectors_pick_the_official_positions(toy):
    """'last' is the token before the first end-of-text (for '' the start token, as the official
    attention_mask.sum() - 2); 'tail' runs from there to the end; pairs are cut to the shorter tail."""
    prompts = ["a red circle", ""]
    ids = common.tokenize(toy, prompts)
    hidden = toy.text_encoder(ids)[0]
    length = ids.shape[1]
    last, empty = uce.token_vectors(toy, prompts, "last")
    torch.testing.assert_close(last, hidden[0, 3:4])
    torch.testing.assert_close(empty, hidden[1, 0:1])
    tails = uce.token_vectors(toy, prompts, "tail")
    assert [len(t) for t in tails] == [length - 3, length]
    assert [len(t) for t in uce.token_vectors(toy, prompts, "all")] == [length, length]
    erase, guide = uce.erase_and_guide_keys(toy, ["a red circle"], [""], "tail")
    assert erase.shape == guide.shape == (length - 3, hidden.shape[-1])
    torch.testing.assert_close(guide, hidden[1, :length - 3])


def test_tail_pairs_end_of_text_with_end_of_text_on_the_real_tokenizer(sd_like):
    """Both official scripts pair from each prompt's last word token (attention_mask.sum() - 2), not position by
    position. Real CLIP tokens: 'Van Gogh' = [SOT, van, gogh, EOT] (last word 2, EOT 3), 'art' = [SOT, art, EOT]
    (last word 1, EOT 2). So 'last' pairs gogh (2) with art (1); 'tail' pairs concept positions 2..76 with guide
    positions 1..75: gogh -> art, EOT (3) -> EOT (2), padding 4 + k -> 3 + k. 'van' (1) is not edited."""
    ids = common.tokenize(sd_like, ["Van Gogh", "art"])
    assert ids[0, :4].tolist() == [49406, 2451, 19697, 49407] and ids[1, :3].tolist() == [49406, 794, 49407]
    with torch.no_grad():
        hidden = sd_like.text_encoder(ids)[0].float()
    erase, guide = uce.erase_and_guide_keys(sd_like, ["Van Gogh"], ["art"], "last")
    torch.testing.assert_close(erase, hidden[0, 2:3])
    torch.testing.assert_close(guide, hidden[1, 1:2])
    erase, guide = uce.erase_and_guide_keys(sd_like, ["Van Gogh"], ["art"], "tail")
    assert erase.shape == guide.shape == (75, 768)
    torch.testing.assert_close(erase, hidden[0, 2:77])
    torch.testing.assert_close(guide, hidden[1, 1:76])
    torch.testing.assert_close(erase[1], hidden[0, 3])  # the concept's end-of-text vector ...
    torch.testing.assert_close(guide[1], hidden[1, 2])  # ... is paired with the guide's end-of-text vector


def test_edit_prompts_pair_each_template():
    erase, guide = uce.edit_prompts(["Van Gogh", "Vincent van Gogh"], "art", ["art by {}"])
    assert erase == ["Van Gogh", "Vincent van Gogh", "art by Van Gogh", "art by Vincent van Gogh"]
    assert guide == ["art", "art", "art by art", "art by art"]
    assert uce.edit_prompts(["church"], "", ["photo of {}"]) == (["church", "photo of church"], ["", "photo of"])


def kv_weights(unet) -> set[str]:
    return {f"unet.{name}.weight" for name, _ in common.attn2_projections(unet)}


def test_toy_edit_moves_the_concept_towards_the_guide(tmp_path, toy):
    """Every attn2.to_k/to_v weight, and nothing else, is replaced; in each, the concept word's key/value is
    now nearer the guide's than before, and a preserved prompt's barely moves."""
    out = tmp_path / "uce-circle"
    uce.main(["--model", "toy", "--concept", "circle", "--preserve", "ring", "--samples", "a circle",
              "--output", str(out), "--device", "cpu"])
    tensors = load_file(out / "erased.safetensors")
    assert set(tensors) == kv_weights(toy.unet)
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "uce" and config["guide"] == "" and config["args"]["lam"] == 0.5
    assert config["erased_token_vectors"] == 3 and config["preserved_token_vectors"] == 1
    (c,), (g,), (r,) = (uce.token_vectors(toy, [p], "last")[0] for p in ["circle", "", "ring"])
    params = dict(toy.unet.named_parameters())
    for key, W_star in tensors.items():
        W0 = params[key[len("unet."):]]
        assert (W_star @ c - W0 @ g).norm() < (W0 @ c - W0 @ g).norm()
        assert (W_star @ r - W0 @ r).norm() < 0.5 * (W_star @ c - W0 @ c).norm()
    common.load_pipeline("toy", erased=out, device="cpu")


def test_sd_interface_tail_expand_preserve(sd_like_path, tmp_path):
    """The SD-v1.4-interface model (77 tokens, 768-d context, 16 attn2 layers): 32 weights replaced."""
    out = tmp_path / "uce-van_gogh"
    uce.main(["--model", str(sd_like_path), "--concept", "van gogh", "--key_tokens", "tail", "--expand",
              "--preserve", "claude monet", "--samples", "a van gogh", "--output", str(out), "--device", "cpu"])
    keys = set(load_file(out / "erased.safetensors"))
    assert keys == kv_weights(common.load_pipeline(str(sd_like_path), device="cpu").unet) and len(keys) == 32
    config = json.loads((out / "config.json").read_text())
    assert config["guide"] == "art" and len(config["erase_prompts"]) == 2 * (1 + len(uce.EXPAND_TEMPLATES["style"]))
    assert config["preserved_token_vectors"] == 77


def test_bad_options_stop_with_a_sentence(tmp_path):
    with pytest.raises(SystemExit, match="key_tokens"):
        uce.main(["--model", "toy", "--concept", "circle", "--key_tokens", "first", "--output", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="lam"):
        uce.main(["--model", "toy", "--concept", "circle", "--lam", "0", "--output", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
