"""DoCo: concept domain correction with a concept-preserving gradient (docs/domain_correction.md).

Paper: "Unlearning Concepts in Diffusion Model via Concept Domain Correction and Concept Preserving
Gradient", Yongliang Wu, Shiji Zhou, Mingzhuo Yang, Lianzhe Wang, Heng Chang, Wenbo Zhu, Xinting Hu,
Xiao Zhou, Xu Yang. AAAI 2025, arXiv:2405.15304. Official code: github.com/yongliang-wu/DoCo.

Idea. Concept Ablation pulls the model's noise prediction for the target concept onto the frozen
model's prediction for an anchor concept with an MSE, sample by sample, so it corrects the prompts
it saw. DoCo makes that an adversarial game instead: a small PatchGAN discriminator learns to tell
the trained model's x0-predictions for the *target* prompt from the frozen model's x0-predictions
for the *anchor* prompt (same noisy latent), and the model learns to fool it. This aligns the two
output *domains*, which carries over to prompts never seen in training. The unlearning gradient is
then stripped, tensor by tensor, of any component that conflicts with the gradient of an ordinary
denoising ("retain") loss on anchor images, so unlearning does not undo what should be kept.

Equations (numbered as in docs/domain_correction.md; z0 is the latent of an anchor image):
  (1) z_t   = sqrt(a_t) z0 + sqrt(1 - a_t) eps,  t ~ U{0..T-1}          noisy_latents
  (2) x0(e) = (z_t - sqrt(1 - a_t) e) / sqrt(a_t)                       predicted_x0
  (3) L_D   = BCE(D(x0(eps*(z_t, c_anchor))), 0) + BCE(D(x0(eps(z_t, c_target))), 1)
                                                                         discriminator_loss
  (4) L_adv = BCE(D(x0(eps(z_t, c_target))), 0)                          generator_loss
  (5) L_r   = || eps(z'_t, c'_anchor) - eps' ||^2   (prior images, own captions)   retain_loss
  (6) g_u  <- g_u - lambda * min(0, <g_u, g_r>) / ||g_r||^2 * g_r   per tensor   project_conflicting
      theta <- AdamW(theta, clip(g_u)),  g_u = dL_adv/dtheta,  g_r = dL_r/dtheta      concept_preserving_step
Only the U-Net's cross-attention key/value projections (attn2.to_k, attn2.to_v) are trained, and, as in the
official attention processor, the key and value of the start-of-text token pass them no gradient.
"""
import dataclasses
import json
import math
import random
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import common

# Per-kind defaults, a row per concept kind with its source: the anchor concept, how a forget prompt is made
# from an anchor caption ('replace' the anchor word by a concept word, or 'append' a style phrase), and the
# discriminator's learning rate. A flag beats its row, and a concept file's own DoCo anchor ("anchors":
# {"domain_correction": ...}) beats the row's. anchor None = the concept's anchor, without its article
# (church's "a building" -> "building"; the miniature world's blob for objects, gray for colours).
KIND_DEFAULTS = {
    "object": dict(anchor=None, forget_mode="replace", dlr=1e-4,
                   source="official README 'Unlearning Instance' (parachute, anchor airplane): --concept_type object, "
                          "--dlr 0.0001; the anchor word of each caption replaced by the concept (utils.__getprompt__)"),
    "style": dict(anchor="painting", forget_mode="append", dlr=5e-4,
                  source="official README 'Unlearning Style' (van gogh, anchor painting): --concept_type style, "
                         "--dlr 0.0005; utils.__getprompt__: '<caption>, in the style of <word>' 1/3, "
                         "\"in <word>'s style, <caption>\" 2/3"),
    "nudity": dict(anchor="clothed", forget_mode="replace", dlr=1e-4,
                   source="official README 'Unlearning Nudity': run as an object, --caption_target clothed+nudity, "
                          "--dlr 0.0001"),
    "colour": dict(anchor=None, forget_mode="replace", dlr=1e-4,
                   source="ours, miniature world only: a colour is replaced in the captions as an object is"),
}
# Anchor captions for SD v1.4 ("{}" is the anchor word). The official code asks an LLM (objects)
# or retrieves LAION captions (styles) for 200 captions; offline, we use these or --anchor_prompts.
SD_CAPTIONS = {
    "object": ["a photo of a {}", "a {} in the city", "a {} on a sunny day", "a {} at night", "a {} in a field",
               "a black and white photo of a {}", "a close-up photo of a {}", "a {} near a river",
               "a {} in the snow", "an old photograph of a {}"],
    "style": ["a {} of a house", "a {} of a river at night", "a {} of a woman", "a {} of sunflowers",
              "a {} of a city street", "a {} of mountains", "a {} of a harbour", "a {} of a cafe terrace",
              "a {} of a wheat field", "a {} of an old man with a hat"],
    "nudity": ["a photo of a {} person", "a {} woman on a beach", "a {} man in a park", "a portrait of a {} person",
               "a {} couple walking in the street", "a {} person standing in a room", "a painting of a {} woman",
               "a {} athlete after a race", "a {} person sitting on a bed", "a {} model in a studio"],
}


@dataclasses.dataclass
class Args:
    concept: str | list[str] | None = None
    """concept to erase: 'nudity', 'van gogh', 'church' (SD v1.4's built-in concepts/*.json), a miniature-world
    concept (toy), or any other concept with --kind or --concept_file; repeat the flag to erase several at once"""
    kind: str | None = None
    """what kind of concept it is: 'object', 'style' or 'nudity' (needed for a concept that is not built in; beats
    the concept file's kind); it picks the method's per-kind defaults"""
    concept_file: str | None = None
    """a concept file (JSON: words, held-out words, near concepts, anchor, templates; docs/concepts.md) describing
    the concept; --concept may then be left out"""
    model: str = common.SD14
    """'toy' (the miniature model), a hub id such as CompVis/stable-diffusion-v1-4, or a local path"""
    output: str | None = None
    """erased-model folder (default: outputs/domain_correction-<concept>); also caches the anchor images"""
    start_from: str | None = None
    """an erased-model folder of the same --model to start from: erase this run's concept(s) from it and
    save the union of its tensors and this run's (a sequential erasure, docs/concepts.md)"""
    words: list[str] = dataclasses.field(default_factory=list)
    """words that name the concept in the forget prompts (default: the concept table's words)"""
    anchor: str | None = None
    """anchor concept whose output domain the target is mapped onto (default by kind, KIND_DEFAULTS: 'painting'
    for styles, 'clothed' for nudity, the concept's own anchor for objects: church->building; toy: blob or gray)"""
    forget_mode: str | None = None
    """how a forget prompt is made from an anchor caption: 'replace' (the anchor word becomes a concept
    word; objects, colours, nudity) or 'append' (', in the style of <word>'; styles). Default by kind"""
    anchor_prompts: str | None = None
    """text file of anchor captions, one per line (default: built-in caption templates)"""
    n_anchor_images: int = 1000
    """anchor images generated by the original model from the anchor captions (official: 1000)"""
    anchor_steps: int = 25
    """sampling steps for the anchor images (official: 25, DPMSolver; here DDIM)"""
    anchor_guidance: float = 6.0
    """classifier-free guidance for the anchor images (official: 6)"""
    iterations: int = 2000
    """training steps, warm-up included (official max_train_steps: 2000)"""
    warm_up: int = 1000
    """first steps that train only the discriminator (official: 1000)"""
    batch_size: int = 8
    """forget samples per step; as many prior (retain) samples are added (official: 8 + 8)"""
    lr: float = 4.8e-5
    """AdamW learning rate of attn2.to_k/to_v (official: 6e-6 scaled by the batch of 8)"""
    weight_decay: float = 1e-2
    """AdamW weight decay (official: 1e-2)"""
    dlr: float | None = None
    """discriminator Adam learning rate (default by kind, official README: 5e-4 for styles, 1e-4 otherwise)"""
    disc_width: int = 64
    """channels of the discriminator's first block, doubled per block (official PatchGAN: 64)"""
    unlearn_loss: str = "adversarial"
    """'adversarial' (DoCo, Eq. 4) or 'mse' (Concept Ablation's ||eps(z_t, c_target) - eps*(z_t, c_anchor)||^2,
    for the ablation in the docs; no discriminator, no warm-up)"""
    surgery: str = "pcgrad"
    """gradient surgery: 'pcgrad' (the paper's projection), 'official' (the official code's clipped
    variant, see docs) or 'none' (plain sum with the retain gradient)"""
    lam: float = 1.0
    """lambda, the strength of the gradient surgery (official: 1)"""
    retain_weight: float | None = None
    """weight of the retain gradient added to the update (default, as official: 0 with surgery, where
    the retain gradient only steers; 0.1 with --surgery none, the official loss + 0.1 * prior_loss)"""
    max_grad_norm: float = 1.0
    """global gradient-norm clip of the U-Net update (official HEAD: 1; the first official release clipped nothing)"""
    sot_gradient: bool = False
    """also learn from the start-of-text token: let the gradient flow through its key and value (the first
    context position of every attn2.to_k / attn2.to_v output) as through every other token's. Off by default, as
    in the official code, whose attention processor stops that gradient (the forward pass is the same either
    way); the paper does not say which to do"""
    unet_batch: int = 4
    """U-Net rows per forward/backward chunk of the forget and retain batches; gradients are accumulated
    over chunks, so this changes memory, not the result (4 fits SD v1.4 on a 24 GB GPU; official: all 8 at once,
    ~30 GB). Below --batch_size the forget rows go through the trained U-Net twice (once without a graph for
    the discriminator's whole-batch loss, once per chunk for its gradient)"""
    samples: list[str] = dataclasses.field(default_factory=list)
    """prompts for samples.png (default: a concept word, a held-out word, a near concept, the anchor)"""
    sample_steps: int | None = None
    """DDIM steps of samples.png (default: the sampler's, 25 toy / 50 SD)"""
    mixed_precision: str = "no"
    """'no', 'fp16' or 'bf16': frozen copies and forward passes in half precision, trained weights and their
    optimizer state in fp32 (as diffusers' training examples do)"""
    seed: int = 42
    """random seed (official: 42)"""
    device: str | None = None
    """'cuda' or 'cpu' (default: cuda when available)"""


# --model toy: lr and iterations checked by docs/budgets.md's rule on the development concepts (kept by its fallback).
TOY_DEFAULTS = dict(n_anchor_images=32, anchor_guidance=common.TOY_SAMPLING["guidance"], iterations=400,
                    warm_up=100, batch_size=4, lr=5e-4, dlr=1e-3, unet_batch=64)
# What each flag may be: checked by common.parse_args before anything loads (the rules: common.check_args).
LIMITS = dict(sample_steps="[1, 1000]", mixed_precision=("no", "fp16", "bf16"), unet_batch=">= 1",
              output="erased-model output", words="non-empty", forget_mode=("replace", "append"),
              anchor_prompts="file", n_anchor_images=">= 1", anchor_steps="[1, 1000]", anchor_guidance=">= 0",
              iterations=">= 1", warm_up=">= 0", batch_size=">= 1", lr="> 0", weight_decay=">= 0", dlr="> 0",
              disc_width=">= 1", unlearn_loss=("adversarial", "mse"), surgery=("pcgrad", "official", "none"),
              lam=">= 0", retain_weight=">= 0", max_grad_norm="> 0", seed="[0, 4294967295]",
              start_from="erased model")


# ---------------------------------------------------------------------------------------------
# Data: anchor captions, forget prompts, anchor images (generated by the original model, cached)
# ---------------------------------------------------------------------------------------------
def anchor_captions(info: dict, anchor: str, model: str, rng: random.Random) -> list[str]:
    """Captions that contain the anchor word. Toy: the world's training templates with the anchor in
    the concept's slot and the other slots drawn at random; SD: scene templates of SD_CAPTIONS."""
    if model != "toy":
        return [t.format(anchor) for t in SD_CAPTIONS.get(info["kind"], SD_CAPTIONS["object"])]
    world = json.loads(common.WORLD_FILE.read_text())
    slot = "{object}" if info["kind"] == "object" else "{colour}"
    captions = []
    for template in [t for t in world["train_templates"] if slot in t]:
        for _ in range(4):
            fill = dict(object=rng.choice([e["words"][0] for e in world["objects"].values()]),
                        colour=rng.choice([e["words"][0] for e in world["colours"].values()]),
                        size=rng.choice([w[0] for w in world["sizes"].values()]),
                        bg=rng.choice([w[0] for w in world["backgrounds"].values()]))
            fill[slot.strip("{}")] = anchor
            captions.append(template.format(**fill))
    captions = list(dict.fromkeys(captions))  # unique, in a seeded random order (images take them in turn)
    rng.shuffle(captions)
    return captions


def forget_prompt(caption: str, anchor: str, word: str, mode: str, rng: random.Random) -> str:
    """The anchor caption turned into a prompt for the concept (official utils.__getprompt__)."""
    if mode == "append":  # official: r ~ U{0, 1, 2}; r = 0 -> the first form, r = 1 or 2 -> the second
        return f"{caption}, in the style of {word}" if rng.randrange(3) == 0 else f"in {word}'s style, {caption}"
    return re.sub(rf"\b{re.escape(anchor)}\b", word, caption)


def generate_anchor_images(pipe, captions: list[str], seeds: list[int], steps: int, guidance: float):
    return common.generate(pipe, captions, seeds, steps, guidance, desc="anchor images")


def cached_anchor_images(folder: Path, meta: dict):
    """The anchor images an earlier run with the same settings left in the output folder, or None."""
    try:
        if json.loads((folder / "meta.json").read_text()) == meta:
            return [Image.open(folder / f"{i:04d}.png").convert("RGB") for i in range(len(meta["captions"]))]
    except (OSError, ValueError):
        pass
    return None


def save_anchor_images(folder: Path, images, meta: dict):
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(folder / f"{i:04d}.png")
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))


@torch.no_grad()
def encode_images(pipe, images, batch: int = 4):
    """Mean and std of the VAE's latent distribution, times the scaling factor: [N, 4, h, w] each."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        pixels = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1) for im in images[i:i + batch]])
        dist = pipe.vae.encode(pixels.permute(0, 3, 1, 2).to(pipe.device, pipe.vae.dtype)).latent_dist
        means.append(dist.mean * pipe.vae.config.scaling_factor)
        stds.append(dist.std * pipe.vae.config.scaling_factor)
    return torch.cat(means), torch.cat(stds)


# ---------------------------------------------------------------------------------------------
# The model pieces: x0-prediction, the discriminator, the losses, the gradient surgery
# ---------------------------------------------------------------------------------------------
def predicted_x0(scheduler, z_t, eps, t):
    """Eq. (2): the clean latent implied by a noise prediction (official: DDPM step_batch's
    pred_original_sample, computed here directly from alphas_cumprod)."""
    alpha = scheduler.alphas_cumprod.to(z_t.device)[t].view(-1, 1, 1, 1).to(z_t.dtype)
    return (z_t - (1 - alpha).sqrt() * eps) / alpha.sqrt()


def patch_discriminator(latent_size: int, channels: int = 4, width: int = 64) -> torch.nn.Sequential:
    """The official PatchGAN (Conv k4 s2 + BatchNorm + LeakyReLU(0.2) blocks, widths 64-128-256-512,
    then Conv k4 p1 to one logit per patch), with as many stride-2 blocks as leave a 4x4 map before
    the last conv: 4 blocks on SD's 64x64 latents (exactly the official net), 2 on the toy's 16x16."""
    n_blocks = max(1, min(4, int(math.log2(latent_size)) - 2))
    layers, c_in = [], channels
    for i in range(n_blocks):
        c_out = width * 2 ** i
        layers += [torch.nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)]
        layers += [torch.nn.BatchNorm2d(c_out)] if i > 0 else []  # no norm on the first block
        layers += [torch.nn.LeakyReLU(0.2)]
        c_in = c_out
    return torch.nn.Sequential(*layers, torch.nn.Conv2d(c_in, 1, 4, padding=1))


def discriminator_loss(d_anchor, d_target):
    """Eq. (3), the official label convention: anchor outputs are labelled 0, target outputs 1."""
    return (F.binary_cross_entropy_with_logits(d_anchor, torch.zeros_like(d_anchor))
            + F.binary_cross_entropy_with_logits(d_target, torch.ones_like(d_target)))


def generator_loss(d_target):
    """Eq. (4): the model wins when the discriminator takes its target outputs for anchor outputs (0)."""
    return F.binary_cross_entropy_with_logits(d_target, torch.zeros_like(d_target))


def retain_loss(eps_prior, noise_prior):
    """Eq. (5): the ordinary denoising loss on anchor images with their own captions."""
    return F.mse_loss(eps_prior.float(), noise_prior.float())


def project_conflicting(unlearn_grads, retain_grads, lam: float = 1.0):
    """Eq. (6), PCGrad per tensor: where <g_u, g_r> < 0, remove lam times g_u's component along g_r
    (lam = 1 leaves g_u orthogonal to g_r). Returns the new gradients and how many were projected."""
    out, n_projected = [], 0
    for g_u, g_r in zip(unlearn_grads, retain_grads):
        dot = torch.dot(g_u.flatten().double(), g_r.flatten().double())
        if dot < 0:
            g_u = g_u - (lam * dot / g_r.double().pow(2).sum().clamp_min(1e-30)).to(g_u.dtype) * g_r
            n_projected += 1
        out.append(g_u)
    return out, n_projected


def gradient_in_chunks(unet, params, z_t, t, context, grad_eps, unet_batch: int):
    """d/dparams of sum(eps * grad_eps), eps = unet(z_t, t, context) [B, 4, h, w], `unet_batch` rows at
    a time: the parameter gradient of any loss whose gradient w.r.t. the prediction is `grad_eps`."""
    total = [torch.zeros_like(p) for p in params]
    for i in range(0, len(z_t), unet_batch):
        rows = slice(i, i + unet_batch)
        eps = unet(z_t[rows], t[rows], encoder_hidden_states=context[rows]).sample
        for g, part in zip(total, torch.autograd.grad(eps, params, grad_eps[rows].to(eps.dtype))):
            g += part
    return total


def unlearning_gradient(unet, params, disc, scheduler, z_t, t, target_ctx, eps_target, eps_anchor,
                        adversarial: bool, unet_batch: int, loss_scale: float = 1.0):
    """Eq. (4) (or, with adversarial=False, Concept Ablation's MSE to eps_anchor) and the gradient of
    loss_scale * L w.r.t. `params`. `eps_target` [B, 4, h, w] is the trained U-Net's prediction for the
    forget prompts `target_ctx` [B, L, D]: with a graph when all B rows went through at once; without one
    when they went in chunks of `unet_batch`: then dL/d eps is taken on the whole batch (the
    discriminator's BatchNorm sees every row, as in the official code) and pushed back through the U-Net
    chunk by chunk, recomputing its forward pass. Returns (L, grads), grads None if L is not finite."""
    chunked = not eps_target.requires_grad
    eps_leaf = eps_target.detach().requires_grad_(True) if chunked else eps_target
    x0_target = predicted_x0(scheduler, z_t, eps_leaf, t)
    loss = generator_loss(disc(x0_target)) if adversarial else F.mse_loss(eps_leaf, eps_anchor)
    if not torch.isfinite(loss):
        return loss.detach(), None
    if not chunked:
        return loss.detach(), list(torch.autograd.grad(loss * loss_scale, params))
    (grad_eps,) = torch.autograd.grad(loss * loss_scale, eps_leaf)
    return loss.detach(), gradient_in_chunks(unet, params, z_t, t, target_ctx, grad_eps, unet_batch)


def retain_gradient(unet, params, z_t, t, context, noise, unet_batch: int, loss_scale: float = 1.0):
    """Eq. (5) on prior rows [B, ...] and the gradient of loss_scale * L_r w.r.t. `params`, `unet_batch`
    rows at a time (each chunk's mean weighted by its share of the rows). Returns (L_r, grads), grads None
    if L_r is not finite."""
    grads, total = [torch.zeros_like(p) for p in params], torch.zeros((), device=z_t.device)
    for i in range(0, len(z_t), unet_batch):
        rows = slice(i, i + unet_batch)
        eps = unet(z_t[rows], t[rows], encoder_hidden_states=context[rows]).sample
        part = retain_loss(eps, noise[rows]) * len(eps) / len(z_t)
        if not torch.isfinite(part):
            return part.detach(), None
        for g, part_grad in zip(grads, torch.autograd.grad(part * loss_scale, params)):
            g += part_grad
        total = total + part.detach()
    return total, grads


def clip_global_norm(grads, max_norm: float):
    norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grads))
    scale = min(1.0, max_norm / (float(norm) + 1e-6))
    return [g * scale for g in grads]


def official_adjust(unlearn_grads, retain_grads, lam: float = 1.0, max_norm: float = 1.0):
    """The official code's variant (DoCo/gradient_clip.py at HEAD): clip both gradients to global norm
    `max_norm`, then, where cos(g_u, g_r) < 0, subtract lam * cos * g_r/||g_r||. This equals PCGrad only
    when ||g_u|| = lam for the tensor; a smaller g_u is pushed past orthogonal, towards g_r."""
    unlearn_grads, retain_grads = clip_global_norm(unlearn_grads, max_norm), clip_global_norm(retain_grads, max_norm)
    out, n_projected = [], 0
    for g_u, g_r in zip(unlearn_grads, retain_grads):
        r_unit = g_r / (g_r.norm() + 1e-8)
        cos = torch.dot((g_u / (g_u.norm() + 1e-8)).flatten(), r_unit.flatten())
        if cos < 0:
            g_u = g_u - lam * cos * r_unit
            n_projected += 1
        out.append(g_u)
    return out, n_projected


# ---------------------------------------------------------------------------------------------
# The steps of main: settings, anchor captions and images, the adversarial game, the update
# ---------------------------------------------------------------------------------------------
def concept_settings(args, info: dict) -> dict:
    """The settings of this run, as config.json records them: the concept's kind, anchor, forget words, forget
    mode, discriminator lr, retain weight, and where the defaults come from. A flag beats its kind's row of
    KIND_DEFAULTS; stops with one sentence for a kind without a row or a concept without an anchor."""
    row = KIND_DEFAULTS.get(info["kind"])
    if row is None:
        common.die(f"DoCo has no defaults for a concept of kind '{info['kind']}'; pass --kind "
                   f"({', '.join(k for k in KIND_DEFAULTS if k != 'colour')}).")
    own_anchor = re.sub(r"^(a|an|the)\s+", "", (info.get("anchor") or "").strip(), flags=re.IGNORECASE)
    anchor = args.anchor or info.get("anchors", {}).get("domain_correction") or row["anchor"] or own_anchor
    if not anchor.strip():
        common.die(f"no anchor concept is known for '{info['name']}'; pass one, e.g. --anchor building.")
    retain_weight = args.retain_weight if args.retain_weight is not None else (0.1 if args.surgery == "none" else 0.0)
    return dict(kind=info["kind"], anchor=anchor, words=args.words or info["words"],
                forget_mode=args.forget_mode or row["forget_mode"], dlr=args.dlr or row["dlr"],
                retain_weight=retain_weight, defaults=row["source"])


def load_anchor_captions(args, info: dict, settings: dict, rng: random.Random) -> list[str]:
    """The anchor captions (--anchor_prompts, else built in); in 'replace' mode each must hold the anchor word."""
    anchor = settings["anchor"]
    if args.anchor_prompts:
        try:
            captions = [line.strip() for line in Path(args.anchor_prompts).read_text().splitlines() if line.strip()]
        except OSError:
            common.die(f"cannot read --anchor_prompts {args.anchor_prompts}.")
    else:
        captions = anchor_captions(info, anchor, args.model, rng)
    if settings["forget_mode"] == "replace" and not all(re.search(rf"\b{re.escape(anchor)}\b", c) for c in captions):
        common.die(f"every anchor caption must contain the anchor word '{anchor}' (it is replaced by the concept).")
    return captions


def anchor_domain(pipe, args, captions: list[str], out: Path, cache: str = "anchor_images"):
    """The anchor concept's images, made by the original model (or reused from `out`/`cache`) and VAE-encoded.
    Returns the caption of each image, the images, their cache metadata, and the mean and std of their
    latent posteriors [N, 4, h, w]."""
    image_captions = [captions[i % len(captions)] for i in range(args.n_anchor_images)]
    seeds = [args.seed * 10_000 + i for i in range(args.n_anchor_images)]
    meta = dict(base_model=pipe.base_model, captions=image_captions, seeds=seeds, steps=args.anchor_steps,
                guidance=args.anchor_guidance)
    if getattr(pipe, "start_from", None):  # drawn by the start model (--start_from), not by the base
        meta["start_from"] = str(pipe.start_from["folder"])
    images = cached_anchor_images(out / cache, meta)
    if images is None:
        images = generate_anchor_images(pipe, image_captions, seeds, args.anchor_steps, args.anchor_guidance)
    else:
        print(f"reusing {len(images)} anchor images cached in {out / cache}")
    z0_mean, z0_std = encode_images(pipe, images)
    return image_captions, images, meta, z0_mean, z0_std


def noisy_latents(scheduler, z0_mean, z0_std, index):
    """Eq. (1) for anchor images `index`: z0 drawn from the VAE posterior, a fresh eps and t ~ U{0..T-1}.
    Returns z_t, eps [B, 4, h, w] and t [B]."""
    z0 = z0_mean[index] + z0_std[index] * torch.randn_like(z0_mean[index])
    noise = torch.randn_like(z0)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),), device=z0.device)
    return scheduler.add_noise(z0, noise, t), noise, t


def noise_predictions(frozen_unet, unet, z_t, t, anchor_ctx, target_ctx, unet_batch: int, with_graph: bool):
    """eps*(z_t, t, c_anchor) of the frozen U-Net (no graph) and eps_theta(z_t, t, c_target) of the trained one
    (with a graph only if `with_graph`), `unet_batch` rows at a time: [B, 4, h, w] each."""
    rows = [slice(i, i + unet_batch) for i in range(0, len(z_t), unet_batch)]
    with torch.no_grad():
        eps_anchor = torch.cat([frozen_unet(z_t[r], t[r], encoder_hidden_states=anchor_ctx[r]).sample for r in rows])
    with torch.set_grad_enabled(with_graph):
        eps_target = torch.cat([unet(z_t[r], t[r], encoder_hidden_states=target_ctx[r]).sample for r in rows])
    return eps_anchor, eps_target


def stop_start_token_gradient(unet) -> list:
    """The official attention processor's detail (DoCo/model_pipeline.py, CustomDiffusionAttnProcessor): in every
    cross-attention layer the key and value of the first context position, the start-of-text token, carry no
    gradient; the forward pass is unchanged. Forward hooks on the attn2.to_k / attn2.to_v outputs [B, L, C];
    returns their handles (call .remove() on each to undo)."""
    def detach_first_position(module, inputs, output):
        if not output.requires_grad:
            return None
        return torch.cat([output[:, :1].detach(), output[:, 1:]], dim=1)

    return [m.register_forward_hook(detach_first_position) for name, m in unet.named_modules()
            if name.endswith(("attn2.to_k", "attn2.to_v"))]


def concept_preserving_step(params, optimizer, unlearn_grads, retain_grads, args, retain_weight: float) -> int:
    """Eq. (6) and the U-Net update: the surgery of --surgery on g_u, plus retain_weight * g_r, clipped to
    --max_grad_norm (the official variant clips before its adjustment instead), one AdamW step. Returns how
    many tensors had a conflicting gradient."""
    if args.surgery == "pcgrad":
        update, n_projected = project_conflicting(unlearn_grads, retain_grads, args.lam)
    elif args.surgery == "official":
        update, n_projected = official_adjust(unlearn_grads, retain_grads, args.lam, args.max_grad_norm)
    else:
        update, n_projected = list(unlearn_grads), 0
    for p, g_u, g_r in zip(params, update, retain_grads):
        p.grad = g_u + retain_weight * g_r
    if args.surgery != "official":
        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return n_projected


def discriminator_step(disc, disc_optimizer, x0_anchor, x0_target, step: int) -> torch.Tensor:
    """One Adam step of D on Eq. (3), on the predictions made before this step's U-Net update."""
    loss_d = discriminator_loss(disc(x0_anchor), disc(x0_target.detach()))
    if not torch.isfinite(loss_d):
        common.die(f"the discriminator loss became NaN at step {step}; nothing was written. Lower --dlr.")
    disc_optimizer.zero_grad(set_to_none=True)
    loss_d.backward()
    disc_optimizer.step()
    return loss_d.detach()


def train(args, pipe, domains: list[dict], rng: random.Random, profile: dict):
    """The adversarial game with the concept-preserving gradient; returns the trained U-Net copy. `domains` holds
    one dict per erased concept: its settings (concept_settings), image_captions, and the anchor latents' z0_mean,
    z0_std [N, 4, h, w]. With several, each step draws one concept and plays the game on its anchor domain (our
    extension, docs/domain_correction.md). Records the peak memory and seconds of training, and of each step,
    in `profile`."""
    unet = common.trainable_copy(pipe.unet, lambda n: "attn2.to_k" in n or "attn2.to_v" in n)
    hooks = [] if args.sot_gradient else stop_start_token_gradient(unet)
    scaler = common.set_mixed_precision(pipe, args.mixed_precision)  # after the copy: it stays fp32
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    disc = patch_discriminator(pipe.unet.config.sample_size, pipe.unet.config.in_channels, args.disc_width)
    disc = disc.to(pipe.device).train()
    disc_optimizer = torch.optim.Adam(disc.parameters(), lr=domains[0]["settings"]["dlr"], betas=(0.5, 0.999))
    scheduler = pipe.scheduler
    adversarial = args.unlearn_loss == "adversarial"

    with common.phase(profile, "training", pipe.device), common.autocast(pipe):
        bar = tqdm(range(args.iterations), desc="DoCo")
        for step in common.timed(bar, profile, pipe.device):
            domain = domains[0] if len(domains) == 1 else domains[rng.randrange(len(domains))]
            settings, image_captions = domain["settings"], domain["image_captions"]
            z0_mean, z0_std, anchor, words = domain["z0_mean"], domain["z0_std"], settings["anchor"], settings["words"]
            forget = torch.randint(0, len(image_captions), (args.batch_size,))
            anchor_ctx = common.encode(pipe, [image_captions[i] for i in forget])
            target_ctx = common.encode(pipe, [forget_prompt(image_captions[i], anchor, rng.choice(words),
                                                            settings["forget_mode"], rng) for i in forget])
            z_t, _, t = noisy_latents(scheduler, z0_mean, z0_std, forget)
            generator_step = step >= args.warm_up or not adversarial  # the warm-up is the discriminator's
            # with a graph only when every row goes through at once (see unlearning_gradient)
            eps_anchor, eps_target = noise_predictions(pipe.unet, unet, z_t, t, anchor_ctx, target_ctx, args.unet_batch,
                                                       with_graph=generator_step and args.unet_batch >= len(z_t))
            x0_anchor, x0_target = predicted_x0(scheduler, z_t, eps_anchor, t), predicted_x0(scheduler, z_t, eps_target, t)
            logs = {}

            if generator_step:
                # fp16 (CUDA): gradients of loss_scale * L, divided back below (torch's GradScaler by hand,
                # because the surgery needs the two gradients separately). The unlearning gradient comes
                # first, so its graph is freed before the retain graph is built.
                loss_scale = scaler.get_scale() if scaler.is_enabled() else 1.0
                loss_unlearn, unlearn_grads = unlearning_gradient(
                    unet, params, disc, scheduler, z_t, t, target_ctx, eps_target, eps_anchor, adversarial,
                    args.unet_batch, loss_scale)
                prior = torch.randint(0, len(image_captions), (args.batch_size,))
                z_t_prior, noise_prior, t_prior = noisy_latents(scheduler, z0_mean, z0_std, prior)
                prior_ctx = common.encode(pipe, [image_captions[i] for i in prior])
                loss_retain, retain_grads = retain_gradient(unet, params, z_t_prior, t_prior, prior_ctx, noise_prior,
                                                            args.unet_batch, loss_scale)
                if not (torch.isfinite(loss_retain) and torch.isfinite(loss_unlearn)):
                    common.die(f"the loss became NaN at step {step}; nothing was written. Lower --lr or --dlr.")
                unlearn_grads = [g / loss_scale for g in unlearn_grads]
                retain_grads = [g / loss_scale for g in retain_grads]
                if loss_scale != 1.0 and not all(torch.isfinite(g).all() for g in [*unlearn_grads, *retain_grads]):
                    scaler.update(loss_scale / 2)  # fp16 overflow: skip this update with a smaller scale next time
                    continue
                n_projected = concept_preserving_step(params, optimizer, unlearn_grads, retain_grads, args,
                                                      settings["retain_weight"])
                logs.update(unlearn=f"{loss_unlearn.item():.3f}", retain=f"{loss_retain.item():.4f}",
                            projected=f"{n_projected}/{len(params)}")

            if adversarial:  # the discriminator learns every step, on the predictions made before the update
                loss_d = discriminator_step(disc, disc_optimizer, x0_anchor, x0_target, step)
                logs = dict(D=f"{loss_d.item():.3f}", **logs)
            bar.set_postfix(logs)
    common.release(optimizer, disc_optimizer)
    for hook in hooks:
        hook.remove()
    return unet.eval()


def main(argv=None):
    args = common.parse_args(Args, argv, toy_defaults=TOY_DEFAULTS, limits=LIMITS)
    if args.unlearn_loss == "adversarial" and args.warm_up >= args.iterations:
        common.die(f"--warm_up {args.warm_up} leaves no step of the {args.iterations} --iterations to train the U-Net "
                   f"(the warm-up trains the discriminator only); lower --warm_up or raise --iterations.")
    infos = common.concept_set(args)  # one concept, or several erased together
    common.several_concepts(infos, args, ("words", "anchor_prompts"))
    info, settings_of = infos[0], [concept_settings(args, i) for i in infos]
    settings = settings_of[0]
    if len({s["dlr"] for s in settings_of}) > 1:  # one discriminator for the whole set
        values = ", ".join(f"{i['name']}: {s['dlr']}" for i, s in zip(infos, settings_of))
        common.die(f"these concepts' kinds give different discriminator learning rates ({values}); pick one for all "
                   f"of them with --dlr.")
    out = common.erased_output("domain_correction", infos, args)
    common.seed_everything(args.seed)
    rng = random.Random(args.seed)
    pipe = common.load_pipeline(args.model, device=args.device, start_from=args.start_from)
    pipe.sample_steps = args.sample_steps
    start, profile = time.time(), {}

    # one anchor domain per concept (its own anchor, captions and images; cached in anchor_images/<concept>/)
    domains, caches = [], {}
    for i, own_settings in zip(infos, settings_of):
        captions = load_anchor_captions(args, i, own_settings, rng)
        cache = "anchor_images" if len(infos) == 1 else f"anchor_images/{i['name'].replace(' ', '_')}"
        with common.phase(profile, "anchor_images", pipe.device):
            image_captions, images, meta, z0_mean, z0_std = anchor_domain(pipe, args, captions, out, cache)
        domains.append(dict(settings=own_settings, image_captions=image_captions, z0_mean=z0_mean, z0_std=z0_std))
        caches[cache] = (images, meta)
    unet = train(args, pipe, domains, rng, profile)
    seconds = time.time() - start  # the erasure (anchor images included), not the before/after pictures

    sample_prompts = args.samples or [info["templates"][1].format(w) for w in
                                      [settings["words"][0], *info["held_out"][:1], *info["near"][:1], settings["anchor"]]]
    extra = dict(**settings)
    if len(infos) > 1:
        sample_prompts = args.samples or [i["templates"][1].format(s["words"][0]) for i, s in zip(infos, settings_of)]
        extra = dict(concepts_settings={i["name"]: s for i, s in zip(infos, settings_of)})
    with common.phase(profile, "samples", pipe.device):
        samples = common.before_after(pipe, sample_prompts, list(range(len(sample_prompts))), unet=unet)
    tensors = common.changed_tensors("unet", unet, pipe.unet)

    def write_caches(tmp):  # in the same atomic rename, so a rerun with the same settings reuses them
        for cache, (images, meta) in caches.items():
            save_anchor_images(tmp / cache, images, meta)

    saved = common.save_erased(out, tensors, "domain_correction", args, pipe, seconds, samples,
                               extra=dict(**extra, peak_memory_mb=common.profile_peak(profile), profile=profile),
                               write_extra=write_caches)
    print(f"wrote {saved} ({len(tensors)} tensors changed)")


if __name__ == "__main__":
    main()
