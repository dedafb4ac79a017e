"""The real CLIP tokenizer, and the memory-saving paths against the plain ones (oracle tests).

Each memory-saving path (rows in chunks through the U-Net, gradient checkpointing, half precision) must give
the loss and gradient of the plain path on a fixed batch: chunking and checkpointing to float32 rounding
(rtol 1e-4), bf16 autocast to its precision (loss within 5 %, gradient cosine above 0.98).
"""
import gzip
import json

import pytest
import torch
import torch.nn.functional as F

import common
import domain_correction as dc
import sage
import sdscale


# ---------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------
def test_real_clip_tokenizer_known_ids():
    """Ids as CLIP ViT-L/14's tokenizer gives them (openai/clip-vit-large-patch14, SD v1.4's tokenizer)."""
    tokenizer = sdscale.load_clip_tokenizer()
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
    assert tokenizer("a photo of a").input_ids == [49406, 320, 1125, 539, 320, 49407]
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.convert_ids_to_tokens(tokenizer("nudity").input_ids[1:-1]) == ["nu", "dity</w>"]
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 49407


def test_committed_tokenizer_files_follow_clips_vocabulary_layout():
    """vocab.json = 256 byte symbols, the same with '</w>', one symbol per merge in merges.txt order, then
    the two special tokens; merges.txt holds the first 48,894 merges."""
    vocab = json.loads((sdscale.TOKENIZER_DIR / "vocab.json").read_text())
    merges = (sdscale.TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    by_id = sorted(vocab, key=vocab.get)
    symbols = list(sdscale.bytes_to_unicode().values())
    assert len(merges) == sdscale.N_MERGES == 48894
    assert by_id[:256] == symbols and by_id[256:512] == [s + "</w>" for s in symbols]
    assert by_id[512:-2] == ["".join(m.split()) for m in merges]
    assert by_id[-2:] == ["<|startoftext|>", "<|endoftext|>"] and list(vocab.values()) == list(range(49408))


def test_build_clip_tokenizer_from_a_bpe_file(tmp_path):
    """The builder on a hand-made merges file: ids in the documented order, the merges applied."""
    bpe = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    bpe.write_bytes(gzip.compress("version line\nh i</w>\nc a\nca t</w>\n".encode()))
    with pytest.raises(SystemExit, match="49,408"):  # a real tokenizer has 49,408 ids; this one has 517
        sdscale.build_clip_tokenizer(bpe, tmp_path / "tok")
    vocab = json.loads((tmp_path / "tok" / "vocab.json").read_text())
    assert len(vocab) == 512 + 3 + 2 and vocab["hi</w>"] == 512 and vocab["cat</w>"] == 514
    tokenizer = sdscale.load_clip_tokenizer(tmp_path / "tok")
    assert tokenizer.convert_ids_to_tokens(tokenizer("hi cat").input_ids) == [
        "<|startoftext|>", "hi</w>", "cat</w>", "<|endoftext|>"]


def test_bytes_to_unicode_is_a_printable_bijection():
    table = sdscale.bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert table[ord("a")] == "a" and table[ord(" ")] == "Ġ" and all(c.isprintable() for c in table.values())


def test_bad_bpe_source_is_one_sentence(tmp_path):
    (tmp_path / "x.whl").write_text("not a zip")
    with pytest.raises(SystemExit, match="pip download --no-deps open-clip-torch"):
        sdscale.read_bpe_merges(tmp_path / "x.whl")


# ---------------------------------------------------------------------------------------------
# Chunked rows: same value and gradient as one pass
# ---------------------------------------------------------------------------------------------
def test_rowwise_backward_equals_one_pass():
    torch.manual_seed(0)
    x, w = torch.randn(7, 5), torch.randn(5, 3)

    def loss_of_rows(rows_x, rows):
        return (torch.tanh(rows_x @ w) ** 2).sum() / 21

    x_plain = x.clone().requires_grad_(True)
    plain = loss_of_rows(x_plain, slice(None))
    plain.backward()
    for chunk in (1, 3, 7, 10):
        loss, grad = common.rowwise_backward(loss_of_rows, x, chunk)
        torch.testing.assert_close(loss, plain.detach())
        torch.testing.assert_close(grad, x_plain.grad)


def test_sage_unet_loss_in_chunks_equals_one_pass(sd_like):
    """Eq. 5 through the frozen U-Net: rows one at a time give the loss and d loss / d context of one pass."""
    torch.manual_seed(0)
    z_t, context = torch.randn(3, 4, 8, 8), common.encode(sd_like, ["a", "b c", "a photo of a church"])
    target = torch.randn(3, 4, 8, 8)
    leaf = context.clone().requires_grad_(True)
    plain = sage.self_erasure_loss(sd_like.unet(z_t, 500, encoder_hidden_states=leaf).sample, target)
    (plain_grad,) = torch.autograd.grad(plain, leaf)
    for unet_batch in (1, 2):
        loss, grad = sage.unet_loss(sage.self_erasure_loss, sd_like.unet, z_t, 500, context, target, unet_batch)
        torch.testing.assert_close(loss, plain.detach(), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(grad, plain_grad, rtol=1e-4, atol=1e-9)


def doco_batch(pipe, batch=4):
    torch.manual_seed(1)
    unet = common.trainable_copy(pipe.unet, lambda n: "attn2.to_k" in n or "attn2.to_v" in n)
    params = [p for p in unet.parameters() if p.requires_grad]
    size = pipe.unet.config.sample_size
    z_t, t = torch.randn(batch, 4, size, size), torch.randint(0, 1000, (batch,))
    context = common.encode(pipe, [f"a photo of a {w}" for w in ["church", "cat", "dog", "tree"][:batch]])
    disc = dc.patch_discriminator(size, 4).train()
    return unet, params, z_t, t, context, disc


@pytest.mark.parametrize("adversarial", [True, False])
def test_doco_unlearning_gradient_in_chunks_equals_one_pass(sd_like, adversarial):
    """The discriminator's BatchNorm couples the rows, so the chunked path takes dL/d eps on the whole batch
    and pushes it back chunk by chunk: same loss and same parameter gradient as one pass with a graph."""
    unet, params, z_t, t, context, disc = doco_batch(sd_like)
    eps_anchor = torch.randn_like(z_t)
    eps_with_graph = unet(z_t, t, encoder_hidden_states=context).sample
    plain_loss, plain = dc.unlearning_gradient(unet, params, disc, sd_like.scheduler, z_t, t, context, eps_with_graph,
                                               eps_anchor, adversarial, unet_batch=4)
    with torch.no_grad():
        eps_no_graph = torch.cat([unet(z_t[i:i + 1], t[i:i + 1], encoder_hidden_states=context[i:i + 1]).sample
                                  for i in range(4)])
    loss, chunked = dc.unlearning_gradient(unet, params, disc, sd_like.scheduler, z_t, t, context, eps_no_graph,
                                           eps_anchor, adversarial, unet_batch=1)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-7)
    scale = max(float(g.abs().max()) for g in plain)
    assert scale > 0
    for g, g_plain in zip(chunked, plain):
        torch.testing.assert_close(g, g_plain, rtol=1e-4, atol=1e-5 * scale)


def test_doco_retain_gradient_in_chunks_equals_one_pass(sd_like):
    unet, params, z_t, t, context, _ = doco_batch(sd_like)
    noise = torch.randn_like(z_t)
    plain_loss = dc.retain_loss(unet(z_t, t, encoder_hidden_states=context).sample, noise)
    plain = torch.autograd.grad(plain_loss, params)
    scale = max(float(g.abs().max()) for g in plain)
    for unet_batch in (1, 3):
        loss, grads = dc.retain_gradient(unet, params, z_t, t, context, noise, unet_batch)
        torch.testing.assert_close(loss, plain_loss.detach(), rtol=1e-5, atol=1e-7)
        for g, g_plain in zip(grads, plain):
            torch.testing.assert_close(g, g_plain, rtol=1e-4, atol=1e-5 * scale)


def test_doco_chunked_training_runs_and_matches_plain_first_step(tmp_path):
    """End to end on the toy: one generator step with --unet_batch 1 (chunked, recomputed) changes the same
    tensors by the same amount as with the whole batch at once."""
    from safetensors.torch import load_file

    outs = {}
    for unet_batch in (1, 64):
        out = tmp_path / f"b{unet_batch}"
        dc.main(["--model", "toy", "--concept", "red", "--iterations", "1", "--warm_up", "0", "--batch_size", "3",
                 "--n_anchor_images", "3", "--anchor_steps", "2", "--unet_batch", str(unet_batch),
                 "--samples", "red", "--sample_steps", "2", "--output", str(out)])
        outs[unet_batch] = load_file(out / "erased.safetensors")
    assert outs[1].keys() == outs[64].keys() and outs[1]
    lr = dc.TOY_DEFAULTS["lr"]
    for key in outs[1]:
        # Adam's first step is lr * g / (|g| + 1e-8): lr * sign(g) except where |g| is near 1e-8, so float
        # rounding may move a rare element by a fraction of lr; a wrong gradient would move many by 2 lr
        diff = (outs[1][key] - outs[64][key]).abs()
        assert float(diff.max()) < 0.05 * lr and float((diff > 1e-7).float().mean()) < 0.01, key


# ---------------------------------------------------------------------------------------------
# Gradient checkpointing and half precision
# ---------------------------------------------------------------------------------------------
def esd_loss_and_grad(pipe, unet, z_t, context, target):
    params = [p for p in unet.parameters() if p.requires_grad]
    with common.autocast(pipe):
        loss = F.mse_loss(unet(z_t, 400, encoder_hidden_states=context).sample.float(), target)
    return loss.detach(), torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


def test_gradient_checkpointing_gives_the_same_gradient(sd_like):
    torch.manual_seed(0)
    unet = common.trainable_copy(sd_like.unet, lambda n: "attn2" not in n)
    z_t, context, target = torch.randn(2, 4, 8, 8), common.encode(sd_like, ["a church", "a tree"]), torch.randn(2, 4, 8, 8)
    plain_loss, plain = esd_loss_and_grad(sd_like, unet, z_t, context, target)
    unet.enable_gradient_checkpointing()
    loss, grad = esd_loss_and_grad(sd_like, unet, z_t, context, target)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad, plain, rtol=1e-4, atol=1e-6 * float(plain.abs().max()))


def test_bf16_mixed_precision_loss_and_gradient_within_tolerance(sd_like_path):
    """ESD's loss with the frozen parts in bf16 and the trained U-Net under autocast: the trained weights
    stay fp32, the loss is within 5 % and the gradient points the same way (cosine > 0.98)."""
    pipe = common.load_pipeline(str(sd_like_path), device="cpu")
    torch.manual_seed(0)
    unet = common.trainable_copy(pipe.unet, lambda n: "attn2" in n)
    z_t, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    context = common.encode(pipe, ["a church", "a tree"])
    plain_loss, plain = esd_loss_and_grad(pipe, unet, z_t, context, target)
    common.set_mixed_precision(pipe, "bf16")
    assert pipe.unet.dtype == pipe.text_encoder.dtype == pipe.vae.dtype == torch.bfloat16
    assert unet.dtype == torch.float32
    loss, grad = esd_loss_and_grad(pipe, unet, z_t, context, target)
    assert abs(float(loss / plain_loss) - 1) < 0.05
    assert float(F.cosine_similarity(grad, plain, dim=0)) > 0.98


def test_changed_tensors_under_mixed_precision(sd_like):
    """A trained tensor is saved even if its change is below bf16's resolution; an untouched one is not."""
    unet = common.trainable_copy(sd_like.unet, lambda n: n == "conv_in.weight")
    with torch.no_grad():
        unet.conv_in.weight.add_(1e-7)
    common.set_mixed_precision(sd_like, "bf16")
    tensors = common.changed_tensors("unet", unet, sd_like.unet)
    assert list(tensors) == ["unet.conv_in.weight"] and tensors["unet.conv_in.weight"].dtype == torch.float32


def test_fp16_on_a_cpu_is_refused_before_loading(tmp_path, monkeypatch):
    import esd

    monkeypatch.setattr(common, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit) as error:
        esd.main(["--model", "toy", "--concept", "circle", "--mixed_precision", "fp16", "--device", "cpu",
                  "--output", str(tmp_path / "out")])
    assert error.value.code == 2 and "--mixed_precision bf16" in str(error.value) and not (tmp_path / "out").exists()


def test_unknown_mixed_precision_is_one_sentence(sd_like):
    with pytest.raises(SystemExit, match="--mixed_precision must be one of no, fp16, bf16"):
        common.set_mixed_precision(sd_like, "fp8")


@pytest.mark.parametrize("method", ["esd", "uce", "sage", "realera", "domain_correction", "sgrace"])
def test_every_method_runs_in_bf16_on_the_sd_interface(method, sd_like_path, tmp_path):
    """Each method end to end with --mixed_precision bf16 on the narrow SD-interface model (real tokenizer);
    its config.json holds a per-phase profile."""
    import importlib

    module = importlib.import_module(method)
    cuts = {"esd": ["--iterations", "1", "--ddim_steps", "2"], "uce": [],
            "sage": ["--iterations", "2", "--warm_up", "1", "--ddim_steps", "2", "--global_candidates", "200",
                     "--unet_batch", "1"],
            "realera": ["--iterations", "1", "--ddim_steps", "2", "--n_trajectories", "1"],
            "domain_correction": ["--iterations", "1", "--warm_up", "0", "--n_anchor_images", "2",
                                  "--anchor_steps", "2", "--batch_size", "2", "--unet_batch", "1"],
            "sgrace": ["--rounds", "1", "--latent_steps", "2", "--projection", "none", "--attack_steps", "1",
                       "--erase_steps", "1"]}[method]
    out = tmp_path / method
    module.main(["--model", str(sd_like_path), "--concept", "church", "--device", "cpu", "--mixed_precision", "bf16",
                 "--sample_steps", "2", "--output", str(out), *cuts])
    config = json.loads((out / "config.json").read_text())
    assert config["args"]["mixed_precision"] == "bf16"
    assert {"training", "samples"} <= set(config["profile"]) and config["peak_memory_mb"] > 0
    assert all(p["peak_memory_mb"] > 0 for p in config["profile"].values() if isinstance(p, dict))
