"""ESD: erasing a concept by fine-tuning the U-Net against negative guidance (docs/esd.md).

Paper: "Erasing Concepts from Diffusion Models", Rohit Gandikota, Joanna Materzynska, Jaden
Fiotto-Kaufman, David Bau. ICCV 2023, arXiv:2303.07345. Official code: github.com/rohitgandikota/erasing
(`esd_sd.py`, diffusers; the paper-era CompVis script is `train-scripts/train-esd.py` in its history).

Idea. Classifier-free guidance pushes a sample *towards* a concept c by adding
eta (eps(x_t, c) - eps(x_t)) to the unconditional prediction; subtracting it pushes *away*.
ESD bakes that negative guidance into the weights: a copy of the U-Net is trained so that its
prediction for c equals what the frozen model would predict when steered away from c. Afterwards,
prompting the edited model with c gives a sample that avoids c. The training latents x_t are the
model's own partial samples of c, so no data set is needed.

Equations (numbered as in docs/esd.md; eps_0 is the frozen original, eps_theta the trained copy,
c_a the anchor, "" by default, which makes eps_0(x_t, c_a) the unconditional prediction):
  (1) k ~ U{0..K-1},  x_t = K-step DDIM of c with guidance g, stopped after k steps;
      t = the DDPM timestep of DDIM step k                               common.sample_until
  (2) eps_target = eps_0(x_t, c_a, t) - eta (eps_0(x_t, c, t) - eps_0(x_t, c_a, t))   esd_target
  (3) L = || eps_theta(x_t, c, t) - eps_target ||^2                                   esd_loss
Only one parameter group of eps_theta is trained: ESD-x the cross-attention (attn2) layers, ESD-u
every layer except cross-attention (and the time embedding and output layers), or everything.
"""
import dataclasses
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import common


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
    """erased-model folder (default: outputs/esd-<concept>)"""
    start_from: str | None = None
    """an erased-model folder of the same --model to start from: erase this run's concept(s) from it and
    save the union of its tensors and this run's (a sequential erasure, docs/concepts.md)"""
    train_method: str | None = None
    """parameters to train: 'xattn' (ESD-x: every attn2 tensor), 'noxattn' (ESD-u: everything except attn2,
    the time embedding and the output layers) or 'full', as the paper-era code; or the new official script's
    groups by its names, 'esd-x', 'esd-u', 'esd-all', 'esd-x-strict' (docs/esd.md). Default: KIND_DEFAULTS
    (the paper: xattn for styles and the miniature world's colours, noxattn for objects and nudity)"""
    words: list[str] = dataclasses.field(default_factory=list)
    """prompts that name the concept, one drawn per iteration (default: the concept table's words)"""
    anchor: str | None = None
    """anchor prompt c_a of Eq. 2 (default: a concept file's "esd" anchor, else as the paper and official code
    '' = the unconditional prediction)"""
    negative_guidance: float = 1.0
    """eta of Eq. 2 (paper: 1; the new official code's 2 means the same target, see docs/esd.md)"""
    iterations: int = 1000
    """training steps (paper: 1000; new official code: 200)"""
    lr: float = 1e-5
    """Adam learning rate (paper: 1e-5; new official code: 5e-5)"""
    batch_size: int = 1
    """partial samples x_t per step (official: 1)"""
    ddim_steps: int = 50
    """K of Eq. 1, the DDIM steps of the sampler that makes x_t (official: 50)"""
    start_guidance: float = 3.0
    """g of Eq. 1, the guidance used to sample x_t (official: 3)"""
    sampler: str = "ddim"
    """the sampler that makes x_t (Eq. 1): 'ddim' (the paper's DDIM, eta 0) or 'pndm' (the new official script:
    SD v1.4's own scheduler, PNDM; from the third step on its t is 20 higher -- noisier -- than DDIM's, docs/esd.md)"""
    sample_from_trained: bool = False
    """sample x_t with the model being trained, as the paper-era code did (default, as the new code and the
    paper's text: the frozen original)"""
    samples: list[str] = dataclasses.field(default_factory=list)
    """prompts for samples.png (default: a concept word, a held-out word, a near concept, the anchor)"""
    sample_steps: int | None = None
    """DDIM steps of samples.png (default: the sampler's, 25 toy / 50 SD)"""
    mixed_precision: str = "no"
    """'no', 'fp16' or 'bf16': frozen copies and forward passes in half precision, the trained U-Net and its
    Adam state in fp32 (diffusers' training examples). ESD-u trains 813 M of the U-Net's 860 M weights with
    Adam: 12 GiB of weights, gradients and Adam state in fp32 whatever this flag says (docs/esd.md)"""
    optimizer_in_backward: bool = False
    """step each parameter's Adam as soon as its gradient is ready and free that gradient, so the U-Net's
    gradients never all exist at once (ESD-u at SD size: 3 GiB of gradients; measured 17.5 -> 14.8 GiB in bf16; the
    same update, docs/esd.md). Not with --mixed_precision fp16, whose loss scaling needs every gradient first"""
    gradient_checkpointing: bool = False
    """recompute the trained U-Net's activations in the backward pass instead of storing them (less memory,
    ~30 % more time per step; same gradients)"""
    seed: int = 0
    """random seed"""
    device: str | None = None
    """'cuda' or 'cpu' (default: cuda when available)"""


# Per-kind defaults (paper Sec. 4 and the official README): ESD-x for artistic styles, whose erasure should
# follow the artist's name; ESD-u for objects and nudity, which should go whatever the prompt's wording.
# The miniature world's colours play the role of styles. --train_method beats the table.
KIND_DEFAULTS = {"style": dict(train_method="xattn"), "object": dict(train_method="noxattn"),
                 "nudity": dict(train_method="noxattn"), "colour": dict(train_method="xattn")}
# --model toy: lr and iterations chosen by docs/budgets.md's rule on the development concepts (triangle, blue).
TOY_DEFAULTS = dict(iterations=200, lr=1e-4, batch_size=2, ddim_steps=common.TOY_SAMPLING["steps"])
# What each flag may be: checked by common.parse_args before anything loads (the rules: common.check_args).
LIMITS = dict(sample_steps="[1, 1000]", mixed_precision=("no", "fp16", "bf16"), sampler=("ddim", "pndm"),
              output="erased-model output", train_method=("xattn", "noxattn", "full", "esd-x", "esd-u", "esd-all",
                                                         "esd-x-strict"), words="non-empty",
              negative_guidance=">= 0", iterations=">= 1", lr="> 0", batch_size=">= 1", ddim_steps="[1, 1000]",
              start_guidance=">= 0", seed="[0, 4294967295]",
              start_from="erased model")


# ---------------------------------------------------------------------------------------------
# Which parameters ESD trains
# ---------------------------------------------------------------------------------------------
def esd_parameter_group(train_method: str, unet=None):
    """A predicate on U-Net parameter names (diffusers naming).
    The paper-era code's groups (train-scripts/train-esd.py), by parameter name:
      xattn = names with 'attn2' (to_q, to_k, to_v, to_out of every cross-attention layer);
      noxattn = everything except attn2, the time embedding MLP and the output layers (CompVis `time_embed`
      and `out.`, here `time_embedding`, `conv_norm_out`, `conv_out`); norms and biases included;
      full = every parameter.
    The new official script's groups (esd_sd.py `get_esd_trainable_parameters`), by module: the weights and
    biases of Linear and Conv2d modules (never a norm), esd-x those inside attn2, esd-u those outside attn2
    (the time embedding, conv_in and conv_out included), esd-all all of them, esd-x-strict only attn2.to_k and
    attn2.to_v. These need `unet` (torch.nn.Module). Raises: common.die for an unknown group."""
    if train_method == "xattn":
        return lambda name: ".attn2." in f".{name}"
    if train_method == "noxattn":
        return lambda name: ".attn2." not in f".{name}" and not name.startswith(
            ("time_embedding.", "conv_norm_out.", "conv_out."))
    if train_method == "full":
        return lambda name: True
    if train_method in ("esd-x", "esd-u", "esd-all", "esd-x-strict"):
        in_layer = {f"{m}.{n}" for m, module in unet.named_modules()
                    if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) for n, _ in module.named_parameters(recurse=False)}
        wanted = {"esd-x": lambda name: ".attn2." in f".{name}", "esd-u": lambda name: ".attn2." not in f".{name}",
                  "esd-all": lambda name: True,
                  "esd-x-strict": lambda name: ".attn2.to_k." in f".{name}" or ".attn2.to_v." in f".{name}"}[train_method]
        return lambda name: name in in_layer and wanted(name)
    common.die(f"--train_method must be xattn, noxattn, full, esd-x, esd-u, esd-all or esd-x-strict, not '{train_method}'.")


def sample_until_pndm(pipe, cond, uncond, seeds: list[int], steps: int, stop: int, guidance: float, unet=None):
    """x_t as the new official script makes it (esd_sd.py with utils/sd_utils.py `run_till_timestep`): the
    SD v1.4 pipeline's own scheduler, PNDM (PLMS, skip_prk_steps), run for the first `stop` of its `steps` steps
    with classifier-free guidance `guidance`; cond/uncond are contexts [B, L, D]. Its 50-step schedule repeats
    one timestep (981, 961, 961, 941, ...), so from stop = 2 on its t is DDIM's t of step stop-1, 20 later.
    Returns x_t [B, C, h, w] (float32) and t (int, the DDPM timestep x_t is at)."""
    from diffusers import PNDMScheduler

    scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)  # fresh: PLMS keeps a history
    scheduler.set_timesteps(steps)
    latents = common.initial_latents(pipe, seeds) * scheduler.init_noise_sigma
    for t in scheduler.timesteps[:stop]:
        eps = common.predict_noise(unet or pipe.unet, latents, t, cond, uncond, guidance)
        latents = scheduler.step(eps, t, latents).prev_sample
    return latents, int(scheduler.timesteps[stop])


def adam_in_backward(params: list, lr: float) -> list:
    """One Adam per parameter, stepped by a hook the moment that parameter's gradient has been accumulated in
    the backward pass, which then frees the gradient (PyTorch's "optimizer step in backward" recipe,
    Tensor.register_post_accumulate_grad_hook). Adam is element-wise, so this is the same update as one Adam
    over all of `params`; what it cannot do is anything that needs every gradient first (clipping by the global
    norm, fp16 loss scaling). Returns the optimizers (for common.release)."""
    optimizers = {p: torch.optim.Adam([p], lr=lr) for p in params}

    def step(p):
        optimizers[p].step()
        optimizers[p].zero_grad(set_to_none=True)

    for p in params:
        p.register_post_accumulate_grad_hook(step)
    return list(optimizers.values())


# ---------------------------------------------------------------------------------------------
# The target and the loss
# ---------------------------------------------------------------------------------------------
def esd_target(eps_anchor: torch.Tensor, eps_concept: torch.Tensor, negative_guidance: float) -> torch.Tensor:
    """Eq. (2): the frozen model's prediction guided *away* from the concept,
    eps_0(x_t, c_a) - eta (eps_0(x_t, c) - eps_0(x_t, c_a))."""
    return eps_anchor - negative_guidance * (eps_concept - eps_anchor)


def esd_loss(eps_trained: torch.Tensor, eps_target: torch.Tensor) -> torch.Tensor:
    """Eq. (3): mean squared error over every element (torch.nn.MSELoss, as the official code)."""
    return F.mse_loss(eps_trained.float(), eps_target.float())


def default_train_method(info: dict) -> str:
    """The kind's row of KIND_DEFAULTS (a concept's kind: common.concept_info)."""
    return KIND_DEFAULTS[info["kind"]]["train_method"]


# ---------------------------------------------------------------------------------------------
# main: the training loop
# ---------------------------------------------------------------------------------------------
def main(argv=None):
    args = common.parse_args(Args, argv, toy_defaults=TOY_DEFAULTS, limits=LIMITS)
    if args.optimizer_in_backward and args.mixed_precision == "fp16":
        common.die("--optimizer_in_backward cannot be used with --mixed_precision fp16, whose loss scaling needs "
                   "every gradient before any step; use --mixed_precision bf16 or leave one of the two out.")
    infos = common.concept_set(args)  # one concept, or several erased together
    common.several_concepts(infos, args)
    info = infos[0]
    words = args.words or info["words"]
    # Several concepts: as the paper-era train-esd.py with --seperator ',' (one of the words drawn per iteration),
    # a concept is drawn per iteration, then one of its words. One parameter group is trained for all of them.
    words_of = {i["name"]: args.words or i["words"] for i in infos}
    anchor_of = {i["name"]: args.anchor if args.anchor is not None else i["anchors"].get("esd", "") for i in infos}
    methods = {default_train_method(i) for i in infos}
    if args.train_method is None and len(methods) > 1:
        kinds = ", ".join(f"{i['name']}: {i['kind']}, {default_train_method(i)}" for i in infos)
        common.die(f"these concepts' kinds train different parameters ({kinds}); pick one group for all of them "
                   f"with --train_method.")
    train_method = args.train_method or default_train_method(info)
    out = common.erased_output("esd", infos, args)
    common.seed_everything(args.seed)
    rng = random.Random(args.seed)
    pipe = common.load_pipeline(args.model, device=args.device, start_from=args.start_from)
    pipe.sample_steps = args.sample_steps
    start, profile = time.time(), {}

    with common.phase(profile, "caching", pipe.device), torch.no_grad():
        word_emb = {w: common.encode(pipe, [w]) for ws in words_of.values() for w in ws}  # [1, L, D] each
        uncond_emb = common.encode(pipe, [""])
        anchor_emb = {a: common.encode(pipe, [a]) for a in set(anchor_of.values())}
    unet = common.trainable_copy(pipe.unet, esd_parameter_group(train_method, pipe.unet))
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    scaler = common.set_mixed_precision(pipe, args.mixed_precision)  # after the copy: it stays fp32
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizers = adam_in_backward(params, args.lr) if args.optimizer_in_backward else [torch.optim.Adam(params, lr=args.lr)]
    n = args.batch_size

    bar = tqdm(range(args.iterations), desc=train_method if train_method.startswith("esd-") else f"ESD-{train_method}")
    with common.phase(profile, "training", pipe.device):
        for step in common.timed(bar, profile, pipe.device):
            concept = info if len(infos) == 1 else rng.choice(infos)
            word = rng.choice(words if len(infos) == 1 else words_of[concept["name"]])
            concept_emb = word_emb[word].expand(n, -1, -1)
            stop = rng.randrange(args.ddim_steps)  # Eq. 1: how many DDIM steps to take before training at x_t
            seeds = [rng.randrange(2**31) for _ in range(n)]
            with torch.no_grad(), common.autocast(pipe):
                sample_until = sample_until_pndm if args.sampler == "pndm" else common.sample_until
                x_t, t = sample_until(pipe, concept_emb, uncond_emb.expand(n, -1, -1), seeds, args.ddim_steps,
                                      stop, args.start_guidance, unet=unet if args.sample_from_trained else None)
                eps_concept = pipe.unet(x_t, t, encoder_hidden_states=concept_emb).sample
                anchor = anchor_emb[anchor_of[concept["name"]]].expand(n, -1, -1)
                eps_anchor = pipe.unet(x_t, t, encoder_hidden_states=anchor).sample
                eps_target = esd_target(eps_anchor, eps_concept, args.negative_guidance)
            with common.autocast(pipe):
                loss = esd_loss(unet(x_t, t, encoder_hidden_states=concept_emb).sample, eps_target)
            if not torch.isfinite(loss):
                common.die(f"the loss became NaN at step {step}; nothing was written. Lower --lr.")
            if args.optimizer_in_backward:
                loss.backward()  # each parameter's Adam steps inside (adam_in_backward)
            else:
                optimizers[0].zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizers[0])
                scaler.update()
            bar.set_postfix(loss=f"{loss.item():.4f}", t=t, word=word)

    common.release(*optimizers)
    unet.eval()
    seconds = time.time() - start  # the erasure itself, not the before/after pictures
    sample_prompts = args.samples or [info["templates"][1].format(w) for w in
                                      [words[0], *info["held_out"][:1], *info["near"][:1]]] + (
        [anchor_of[info["name"]]] if anchor_of[info["name"]].strip() else [])  # the anchor prompt as it is
    if len(infos) > 1 and not args.samples:  # one picture per erased concept
        sample_prompts = [i["templates"][1].format(words_of[i["name"]][0]) for i in infos]
        words = words_of  # config.json: each concept's words
    with common.phase(profile, "samples", pipe.device):
        samples = common.before_after(pipe, sample_prompts, list(range(len(sample_prompts))), unet=unet)
    tensors = common.changed_tensors("unet", unet, pipe.unet)
    saved = common.save_erased(out, tensors, "esd", args, pipe, seconds, samples,
                               extra=dict(train_method=train_method, words=words, trained_tensors=len(params),
                                          anchor=anchor_of if len(infos) > 1 else anchor_of[info["name"]],
                                          peak_memory_mb=common.profile_peak(profile), profile=profile))
    variant = train_method if train_method.startswith("esd-") else f"ESD-{train_method}"
    print(f"wrote {saved} ({variant}, {len(tensors)} of {len(params)} trained tensors changed)")


if __name__ == "__main__":
    main()
