"""The miniature world: a Stable Diffusion small enough to train and erase on a CPU.

Docs: docs/toyworld.md.  Run `python toyworld.py` to rebuild assets/toy/ (the pipeline, in
diffusers layout) and assets/toy_judge/ (the judging classifier) from a seed.

The world: one object (circle, ring, square, ... see assets/world.json) of one colour and size
on a dark or light background, 32x32 RGB.  Captions name the factors with synonyms, so the text
encoder learns a concept *domain* (several words for one visual concept), and some words are held
out of every erasure script's defaults and used only by evaluate.py.

The parts have the same classes and interface as SD v1.4: AutoencoderKL (4-channel latents),
CLIPTextModel + tokenizer, UNet2DConditionModel with cross-attention, DDIM scheduler with SD's
beta schedule.  The tokenizer is word-level (one token per word) instead of CLIP's BPE.
"""
import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
WORLD_FILE = HERE / "assets" / "world.json"
PIPELINE_DIR = HERE / "assets" / "toy"
JUDGE_DIR = HERE / "assets" / "toy_judge"
BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<|unk|>"
MAX_TOKENS = 24  # the miniature model's context length (SD v1.4: 77)


def load_world() -> dict:
    return json.loads(WORLD_FILE.read_text())


WORLD = load_world()
OBJECTS = list(WORLD["objects"])
COLOURS = list(WORLD["colours"])
SIZES = list(WORLD["sizes"])
BACKGROUNDS = list(WORLD["backgrounds"])


# ----------------------------------------------------------------------------------------------
# Renderer
# ----------------------------------------------------------------------------------------------
def shape_mask(obj: str, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Coverage in [0, 1] of shape `obj` of radius r at grid points (x, y) (y points down)."""
    d = np.sqrt(x**2 + y**2)
    if obj == "circle":
        return (d < r).astype(np.float32)
    if obj == "ring":
        return ((d < r) & (d > 0.55 * r)).astype(np.float32)
    if obj == "square":
        return ((np.abs(x) < 0.8 * r) & (np.abs(y) < 0.8 * r)).astype(np.float32)
    if obj == "diamond":
        return (np.abs(x) + np.abs(y) < 1.05 * r).astype(np.float32)
    if obj == "triangle":  # pointing up
        top, bottom = -0.9 * r, 0.75 * r
        half_width = (y - top) / (bottom - top) * 0.95 * r
        return ((y > top) & (y < bottom) & (np.abs(x) < half_width)).astype(np.float32)
    if obj == "star":  # five points, radius alternating between r and 0.42 r
        theta = np.arctan2(x, -y) % (2 * np.pi / 5) / (2 * np.pi / 5)  # position inside one point
        tri = np.abs(theta - 0.5) * 2  # 1 at a tip, 0 between tips
        return (d < 0.42 * r + 0.58 * r * tri**1.5).astype(np.float32)
    if obj == "cross":
        arm = 0.32 * r
        return (((np.abs(x) < arm) & (np.abs(y) < r)) | ((np.abs(y) < arm) & (np.abs(x) < r))).astype(np.float32)
    if obj == "heart":
        u, v = x / (0.78 * r), -(y + 0.1 * r) / (0.78 * r)
        return ((u**2 + v**2 - 1) ** 3 - u**2 * v**3 < 0).astype(np.float32)
    if obj == "blob":  # soft-edged patch: the neutral "anchor" object
        return np.clip(1.4 * np.exp(-(d**2) / (2 * (0.5 * r) ** 2)), 0, 1).astype(np.float32)
    raise ValueError(f"unknown object {obj!r}")


def render(obj: str, colour: str, size: str, bg: str, rng: np.random.Generator, res: int = 32) -> np.ndarray:
    """One uint8 image [res, res, 3]; shapes are supersampled 4x for anti-aliasing."""
    ss = 4
    coords = (np.arange(res * ss) + 0.5) / ss
    cx, cy = res / 2 + rng.uniform(-2.5, 2.5, size=2)
    y, x = np.meshgrid(coords - cy, coords - cx, indexing="ij")
    r = (6.5 if size == "small" else 11.0) * res / 32 * rng.uniform(0.92, 1.08)
    alpha = shape_mask(obj, x, y, r).reshape(res, ss, res, ss).mean(axis=(1, 3))[..., None]
    fg = np.array(WORLD["colours"][colour]["rgb"], np.float32) + rng.uniform(-14, 14, size=3)
    level = rng.uniform(15, 45) if bg == "dark" else rng.uniform(205, 240)
    back = np.full(3, level, np.float32) + rng.uniform(-5, 5, size=3)
    img = alpha * fg + (1 - alpha) * back
    return np.clip(img, 0, 255).astype(np.uint8)


def random_factors(rng: np.random.Generator, n: int) -> np.ndarray:
    """[n, 4] integer labels: object, colour, size, background."""
    return np.stack([rng.integers(len(OBJECTS), size=n), rng.integers(len(COLOURS), size=n),
                     rng.integers(len(SIZES), size=n), rng.integers(len(BACKGROUNDS), size=n)], axis=1)


def render_batch(factors: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """Images in [-1, 1], [n, 3, 32, 32]."""
    imgs = np.stack([render(OBJECTS[o], COLOURS[c], SIZES[s], BACKGROUNDS[b], rng) for o, c, s, b in factors])
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1


def caption(factors, rng: np.random.Generator, words: str = "all") -> str:
    """A caption for one image; words='all' draws synonyms and held-out words alike (training)."""
    o, c, s, b = (int(v) for v in factors)
    template = WORLD["train_templates"][rng.integers(len(WORLD["train_templates"]))]

    def pick(entry):
        pool = entry["words"] + (entry["held_out"] if words == "all" else [])
        return pool[rng.integers(len(pool))]

    size_words, bg_words = WORLD["sizes"][SIZES[s]], WORLD["backgrounds"][BACKGROUNDS[b]]
    return template.format(object=pick(WORLD["objects"][OBJECTS[o]]), colour=pick(WORLD["colours"][COLOURS[c]]),
                           size=size_words[rng.integers(len(size_words))], bg=bg_words[rng.integers(len(bg_words))])


# ----------------------------------------------------------------------------------------------
# Tokenizer and models (same classes as SD v1.4, narrow)
# ----------------------------------------------------------------------------------------------
def vocabulary() -> list[str]:
    words = set(WORLD["filler_words"]) | {WORLD["generic_object"]}
    for group in ("objects", "colours"):
        for entry in WORLD[group].values():
            for phrase in entry["words"] + entry["held_out"]:
                words.update(phrase.split())
    for group in ("sizes", "backgrounds"):
        for synonyms in WORLD[group].values():
            words.update(synonyms)
    for template in WORLD["train_templates"] + WORLD["eval_templates"]:
        words.update(w for w in template.split() if "{" not in w)
    return [BOS, EOS, UNK] + sorted(words)  # EOS id 1 (not 2: transformers treats eos id 2 as legacy CLIP)


def build_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A {EOS}", special_tokens=[(BOS, 0), (EOS, 1)])
    # SD v1.4 pads with the end-of-text token too, so pooled features read the first EOS.
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=EOS,
                                   model_max_length=MAX_TOKENS)


def build_models(vocab_size: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
                        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                        mid_block_add_attention=False)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=64))
    # CLIP's initialisation (std 0.02) makes every prompt's context almost the same after the final
    # layer norm; from scratch the U-Net then learns to ignore the text.  Distinct words start distinct.
    text_encoder.get_input_embeddings().weight.data.normal_(0.0, 1.0)
    # SD's U-Net in miniature: a plain ResNet level at 16x16, cross-attention at 8x8 (down, mid, up:
    # 4 attn2 layers; SD v1.4 has 16).  ~1.0M parameters, ~0.25 s per batch-32 step on 2 cores.
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16)
    return vae, text_encoder, unet


class Judge(nn.Module):
    """The judging classifier: object, colour, size and background heads on a small CNN."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict({"object": nn.Linear(128, len(OBJECTS)), "colour": nn.Linear(128, len(COLOURS)),
                                    "size": nn.Linear(128, len(SIZES)), "background": nn.Linear(128, len(BACKGROUNDS))})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """128-d features of images in [-1, 1] (used for the Frechet distance in evaluate.py)."""
        return self.body(images)

    def forward(self, images: torch.Tensor) -> dict:
        h = self.features(images)
        return {name: head(h) for name, head in self.heads.items()}


def load_judge(device="cpu", folder: Path = JUDGE_DIR) -> Judge:
    from safetensors.torch import load_file

    if not (Path(folder) / "judge.safetensors").exists():
        raise SystemExit(f"error: the miniature world's judge is missing from {folder}; run `python toyworld.py`.")
    judge = Judge()
    judge.load_state_dict(load_file(Path(folder) / "judge.safetensors"))
    return judge.eval().requires_grad_(False).to(device)


@torch.no_grad()
def judge_images(judge: Judge, images) -> dict:
    """Predicted factor names for a list of PIL images (or a [n,3,32,32] tensor in [-1, 1])."""
    if not torch.is_tensor(images):
        images = torch.stack([torch.from_numpy(np.array(im.convert("RGB").resize((32, 32)))) for im in images])
        images = images.permute(0, 3, 1, 2).float() / 127.5 - 1
    device = next(judge.parameters()).device
    logits = judge(images.to(device))
    names = {"object": OBJECTS, "colour": COLOURS, "size": SIZES, "background": BACKGROUNDS}
    return {k: [names[k][i] for i in v.argmax(1).tolist()] for k, v in logits.items()}


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def degrade(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Noise and blur, so the judge stays right on imperfect generated images."""
    n = images.shape[0]
    blur = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(n, 1, 1, 1, generator=gen)
    images = mix * images + (1 - mix) * blur
    return (images + 0.08 * torch.rand(n, 1, 1, 1, generator=gen) * torch.randn(images.shape, generator=gen)).clamp(-1, 1)


def train_vae(vae, steps, rng, gen, log, device):
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    for step in (bar := tqdm(range(steps), desc="vae", mininterval=2)):
        x = render_batch(random_factors(rng, 32), rng).to(device)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(device)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(mse=f"{loss.item():.4f}")
    log["vae_final_mse"] = round(loss.item(), 5)


def train_judge(judge, vae, steps, rng, gen, log, device):
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    judge.train()
    for step in (bar := tqdm(range(steps), desc="judge", mininterval=2)):
        factors = random_factors(rng, 128)
        x = render_batch(factors, rng)
        with torch.no_grad():  # half the batch through the VAE: the judge sees decoded images
            x[:64] = vae.decode(vae.encode(x[:64].to(device)).latent_dist.mean).sample.clamp(-1, 1).cpu()
        logits = judge(degrade(x, gen).to(device))
        labels = torch.from_numpy(factors).to(device)
        loss = sum(F.cross_entropy(logits[k], labels[:, i]) for i, k in enumerate(judge.heads))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    judge.eval()


@torch.no_grad()
def judge_accuracy(judge, n, rng) -> dict:
    factors = random_factors(rng, n)
    device = next(judge.parameters()).device
    pred = judge(render_batch(factors, rng).to(device))
    return {k: round(float((pred[k].argmax(1).cpu().numpy() == factors[:, i]).mean()), 4) for i, k in enumerate(judge.heads)}


def caption_labels(factors, text: str) -> list[int]:
    """Factor labels a caption states; a factor it does not mention gets the extra class 'unspecified'."""
    words = set(text.split())
    labels = []
    for k, (group, names) in enumerate([("objects", OBJECTS), ("colours", COLOURS)]):
        entry = WORLD[group][names[factors[k]]]
        said = any(all(w in words for w in phrase.split()) for phrase in entry["words"] + entry["held_out"])
        labels.append(int(factors[k]) if said else len(names))
    for k, (group, names) in enumerate([("sizes", SIZES), ("backgrounds", BACKGROUNDS)], start=2):
        labels.append(int(factors[k]) if words & set(WORLD[group][names[factors[k]]]) else len(names))
    return labels


def pretrain_text_encoder(text_encoder, tokenizer, steps, rng, log, device):
    """The miniature counterpart of CLIP pre-training: the pooled (end-of-text) feature must tell which
    object, colour, size and background a caption states.  Synonyms then share a meaning before the
    U-Net ever sees them, as SD's frozen CLIP encoder gave SD a ready-made concept domain."""
    dims = [len(OBJECTS) + 1, len(COLOURS) + 1, len(SIZES) + 1, len(BACKGROUNDS) + 1]
    heads = nn.ModuleList([nn.Linear(text_encoder.config.hidden_size, d) for d in dims]).to(device)
    params = list(text_encoder.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    for step in (bar := tqdm(range(steps), desc="text encoder", mininterval=2)):
        factors = random_factors(rng, 128)
        captions = [caption(f, rng) for f in factors]
        labels = torch.tensor([caption_labels(f, c) for f, c in zip(factors, captions)], device=device)
        ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids.to(device)
        pooled = text_encoder(ids).pooler_output
        loss = sum(F.cross_entropy(head(pooled), labels[:, k]) for k, head in enumerate(heads))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    log["text_pretrain_final_loss"] = round(loss.item(), 5)


def train_diffusion(vae, text_encoder, unet, tokenizer, scheduler, steps, batch, n_images, rng, gen, log, device, lr, max_weight=1.0):
    with torch.no_grad():  # a fixed pool of rendered images, encoded once
        factors = random_factors(rng, n_images)
        latents = torch.cat([vae.encode(render_batch(factors[i:i + 500], rng).to(device)).latent_dist.mean
                             for i in range(0, n_images, 500)]) * vae.config.scaling_factor
    params = list(unet.parameters())  # the text encoder stays frozen, as SD v1.4's CLIP encoder did
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    alphas = scheduler.alphas_cumprod.to(device)
    for step in (bar := tqdm(range(steps), desc="unet", mininterval=2)):
        idx = rng.integers(n_images, size=batch)
        # 10% empty captions, for classifier-free guidance
        captions = ["" if rng.random() < 0.1 else caption(factors[i], rng) for i in idx]
        ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        z0 = latents[torch.from_numpy(idx).to(device)]
        noise = torch.randn(z0.shape, generator=gen).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen).to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        with torch.no_grad():
            context = text_encoder(ids)[0]
        pred = unet(zt, t, encoder_hidden_states=context).sample
        # eps-loss weighted towards high noise, min(1/SNR, max_weight) >= 1: at 16x16 latents the image
        # is readable from z_t down to low SNR, and a plain eps-loss barely rewards using the text there.
        weight = ((1 - a) / a).clamp(1.0, max_weight) if max_weight > 1 else torch.ones_like(a)
        loss = (weight * (pred - noise) ** 2).mean() / weight.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    log["diffusion_final_loss"] = round(loss.item(), 5)


# ----------------------------------------------------------------------------------------------
# Acceptance measurements
# ----------------------------------------------------------------------------------------------
def generator_accuracy(pipe, judge, words: str, seeds: int, steps: int, guidance: float, first_seed: int = 0) -> dict:
    """Judge images for every (colour, object) pair, 'a {colour} {object}' with canonical words
    (words='canonical'), or with every synonym and held-out word in turn (words='synonyms'), with seeds
    first_seed .. first_seed + seeds - 1 (the acceptance figures use 0..; choices such as the guidance
    scale were made on other seeds)."""
    import common

    prompts, truth = [], []
    for o in OBJECTS:
        for c in COLOURS:
            if words == "canonical":
                pairs = [(o, c)]
            else:  # each non-canonical object word with the canonical colour, and vice versa
                ow = WORLD["objects"][o]["words"][1:] + WORLD["objects"][o]["held_out"]
                cw = WORLD["colours"][c]["words"][1:] + WORLD["colours"][c]["held_out"]
                pairs = [(w, c) for w in ow] + [(o, w) for w in cw]
            for ow_, cw_ in pairs:
                prompts += [f"a {cw_} {ow_}"] * seeds
                truth += [(o, c)] * seeds
    seed_list = [first_seed + s % seeds for s in range(len(prompts))]
    images = common.generate(pipe, prompts, seed_list, steps=steps, guidance=guidance, desc=f"judge {words}")
    pred = judge_images(judge, images)
    obj_acc = float(np.mean([p == t[0] for p, t in zip(pred["object"], truth)]))
    col_acc = float(np.mean([p == t[1] for p, t in zip(pred["colour"], truth)]))
    return {"images": len(prompts), "object_accuracy": round(obj_acc, 4), "colour_accuracy": round(col_acc, 4)}


@torch.no_grad()
def synonym_cosines(pipe) -> dict:
    """Mean cosine similarity of pooled text features, within a concept's words vs across concepts."""
    import common

    table = {}
    feats = {o: F.normalize(common.pooled_features(pipe, WORLD["objects"][o]["words"] + WORLD["objects"][o]["held_out"]), dim=-1)
             for o in OBJECTS}
    for o in OBJECTS:
        within = feats[o] @ feats[o].T
        n = within.shape[0]
        within_mean = (within.sum() - n) / max(1, n * n - n)
        across = torch.cat([(feats[o] @ feats[p].T).flatten() for p in OBJECTS if p != o]).mean()
        table[o] = {"within": round(float(within_mean), 3), "across": round(float(across), 3)}
    return table


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="seed for rendering, initialisation and training")
    parser.add_argument("--vae_steps", type=int, default=800, help="VAE training steps (batch 32)")
    parser.add_argument("--judge_steps", type=int, default=600, help="judge training steps (batch 128)")
    parser.add_argument("--text_steps", type=int, default=600, help="text-encoder pre-training steps (batch 128)")
    parser.add_argument("--steps", type=int, default=6000, help="U-Net training steps")
    parser.add_argument("--batch", type=int, default=32, help="U-Net batch size")
    parser.add_argument("--max_weight", type=float, default=20.0,
                        help="cap of the high-noise loss weight min(1/SNR, cap) (1: SD's plain eps-loss)")
    parser.add_argument("--images", type=int, default=20000, help="rendered training images (latents cached)")
    parser.add_argument("--eval_seeds", type=int, default=8, help="seeds per prompt for the acceptance check (0: skip it)")
    parser.add_argument("--output", type=Path, default=HERE / "assets", help="where toy/ and toy_judge/ are written")
    parser.add_argument("--lr", type=float, default=1e-3, help="U-Net learning rate")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="where to train (the committed model was built on a CPU)")
    parser.add_argument("--check", action="store_true",
                        help="no training: re-measure the acceptance figures of the build in --output (e.g. after a "
                             "change of the sampling defaults) and update its build_log.json and sample grid")
    import common

    parser.error = lambda message: common.die(f"{message} (see --help).")  # one line, exit status 2
    args = parser.parse_args()
    common.check_args(args, dict(seed="[0, 4294967295]", vae_steps=">= 1", judge_steps=">= 1", text_steps=">= 1",
                                 steps=">= 1", batch=">= 1", max_weight="> 0", images=">= 1", eval_seeds=">= 0",
                                 lr="> 0", threads=">= 0"))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.check:
        if not args.eval_seeds:
            parser.error("--check needs --eval_seeds of 1 or more")
        if not (args.output / "toy_judge" / "build_log.json").is_file():
            common.die(f"--check re-measures a build, and {args.output} holds none (no toy_judge/build_log.json).")
        log = json.loads((args.output / "toy_judge" / "build_log.json").read_text())
        return acceptance(args.output, args.eval_seeds, args.device, log)

    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from safetensors.torch import save_file

    start = time.time()
    torch.manual_seed(args.seed)
    rng, gen = np.random.default_rng(args.seed), torch.Generator().manual_seed(args.seed)
    tokenizer = build_tokenizer()
    device = args.device
    vae, text_encoder, unet = (m.to(device) for m in build_models(len(tokenizer)))
    # SD v1.4's DDIM settings with DDPM's linear betas: at 16x16 latents SD's scaled_linear schedule
    # leaves the image's mean colour readable at t = T, and samples then follow the seed, not the text.
    scheduler = DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)
    log = {"seed": args.seed, "torch_threads": torch.get_num_threads(), "args": {k: str(v) for k, v in vars(args).items()}}

    train_vae(vae, args.vae_steps, rng, gen, log, device)
    vae.eval().requires_grad_(False)
    with torch.no_grad():  # choose the scaling factor so that scaled latents have unit std, as SD did
        z = vae.encode(render_batch(random_factors(rng, 512), rng).to(device)).latent_dist.mean
    vae.register_to_config(scaling_factor=round(1.0 / float(z.std()), 5))
    log["vae_scaling_factor"] = vae.config.scaling_factor

    judge = Judge().to(device)
    train_judge(judge, vae, args.judge_steps, rng, gen, log, device)
    log["judge_accuracy_fresh_renders"] = judge_accuracy(judge, 4000, np.random.default_rng(args.seed + 1))

    pretrain_text_encoder(text_encoder, tokenizer, args.text_steps, rng, log, device)
    text_encoder.eval().requires_grad_(False)
    train_diffusion(vae, text_encoder, unet, tokenizer, scheduler, args.steps, args.batch, args.images, rng, gen, log,
                    device, args.lr, args.max_weight)
    vae, text_encoder, unet, judge = vae.cpu(), text_encoder.cpu(), unet.cpu(), judge.cpu()
    log["train_seconds"] = round(time.time() - start, 1)

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                                   unet=unet.eval(), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    out_pipe, out_judge = args.output / "toy", args.output / "toy_judge"
    common.atomic_save_dir(out_pipe, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))

    def write_judge(tmp):
        save_file(judge.state_dict(), tmp / "judge.safetensors")
        (tmp / "classes.json").write_text(json.dumps({"object": OBJECTS, "colour": COLOURS, "size": SIZES,
                                                      "background": BACKGROUNDS}, indent=1))
        (tmp / "build_log.json").write_text(json.dumps(log, indent=1))
    common.atomic_save_dir(out_judge, write_judge)

    if args.eval_seeds:  # 0 (tests): build only; `--check` can measure later
        acceptance(args.output, args.eval_seeds, device, log)


def acceptance(out: Path, eval_seeds: int, device: str, log: dict):
    """The spec's acceptance figures, measured on the saved and reloaded pipeline (out/toy, out/toy_judge) at
    the miniature model's sampling defaults; written into out/toy_judge/build_log.json, with the sample grid."""
    import common

    t0 = time.time()
    pipe, judge = common.load_pipeline(str(out / "toy"), device=device), load_judge(device, out / "toy_judge")
    steps, guidance = common.TOY_SAMPLING["steps"], common.TOY_SAMPLING["guidance"]
    log["acceptance_sampling"] = {"steps": steps, "guidance": guidance, "seeds": f"0..{eval_seeds - 1}"}
    log["generator_canonical"] = generator_accuracy(pipe, judge, "canonical", eval_seeds, steps, guidance)
    log["generator_synonyms"] = generator_accuracy(pipe, judge, "synonyms", max(1, eval_seeds // 4), steps, guidance)
    log["synonym_cosines"] = synonym_cosines(pipe)
    log["acceptance_seconds"] = round(time.time() - t0, 1)
    log["total_seconds"] = round(log["train_seconds"] + log["acceptance_seconds"], 1)
    tmp = out / "toy_judge" / "build_log.json.tmp"
    tmp.write_text(json.dumps(log, indent=1))
    tmp.replace(out / "toy_judge" / "build_log.json")
    print(json.dumps({k: v for k, v in log.items() if k != "synonym_cosines"}, indent=1))

    docs = HERE / "docs" / "img" if out == HERE / "assets" else out
    docs.mkdir(parents=True, exist_ok=True)
    sample_grid(pipe, steps, guidance).save(docs / "toy_samples.png")


def sample_grid(pipe, steps: int, guidance: float, seed: int = 0):
    """One row per object, one column per colour: 'a {colour} {object}', the same seed everywhere."""
    import common

    rows = [common.generate(pipe, [f"a {c} {o}" for c in COLOURS], [seed] * len(COLOURS), steps=steps,
                            guidance=guidance, progress=False) for o in OBJECTS]
    return common.image_grid(rows, OBJECTS, scale=2)


if __name__ == "__main__":
    main()
