"""UCE: unified concept editing, a closed-form edit of the cross-attention projections (docs/uce.md).

Paper: "Unified Concept Editing in Diffusion Models", Rohit Gandikota, Hadas Orgad, Yonatan Belinkov,
Joanna Materzynska, David Bau. WACV 2024, arXiv:2308.14761. Official code:
github.com/rohitgandikota/unified-concept-editing (`trainscripts/uce_sd_erase.py`; the paper-era
script is `train-scripts/train_erase.py` in its history).

Idea. Text reaches the U-Net only through the cross-attention keys W_k c and values W_v c of each
token vector c. Change W_k and W_v so that the concept's token vectors produce the keys and values
of a harmless guide concept, and the U-Net never "hears" the concept, whatever it generates. Asking
at the same time that other (preserved) token vectors keep their keys and values, and that W moves
little, is a linear least-squares problem in W with a closed-form solution: no training, no images,
seconds on SD v1.4.

Equations (numbered as in docs/uce.md). For every attn2.to_k and attn2.to_v weight W0 [d_out, d_in],
with erased token vectors c_i (concept words), their guide vectors c_i^g (guide prompt, same token
position), preserved token vectors c_j, lambda the regulariser and s_e, s_p the erase and preserve
scales:
  (1) v*_i = W0 c_i^g                                                     (target value)
  (2) W* = argmin_W  s_e sum_i ||W c_i - v*_i||^2 + s_p sum_j ||W c_j - W0 c_j||^2 + lambda ||W - W0||_F^2
  (3)    = (lambda W0 + s_e sum_i v*_i c_i^T + s_p sum_j W0 c_j c_j^T)
           (lambda I + s_e sum_i c_i c_i^T + s_p sum_j c_j c_j^T)^-1          closed_form_edit
"""
import copy
import dataclasses
import time
from pathlib import Path

import torch
from tqdm import tqdm

import common

# The official `--expand_prompts true` templates, by concept type ('art' for styles, 'object' otherwise).
# Per-kind defaults (official train-scripts/train_erase.py and its README): artists are guided to "art" and
# expanded with the 'art' templates; objects and nudity are guided to " " (the unconditional, here "") with the
# 'object' templates. The miniature world's colours and objects are guided to "" and expand with their own
# caption templates. --guide beats the table.
KIND_DEFAULTS = {"style": dict(guide="art", expand="style"), "object": dict(guide="", expand="object"),
                 "nudity": dict(guide="", expand="object"), "colour": dict(guide="", expand="object")}
EXPAND_TEMPLATES = {
    "style": ["painting by {}", "art by {}", "artwork by {}", "picture by {}", "style of {}"],
    "object": ["image of {}", "photo of {}", "portrait of {}", "picture of {}", "painting of {}"],
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
    """erased-model folder (default: outputs/uce-<concept>)"""
    start_from: str | None = None
    """an erased-model folder of the same --model to start from: erase this run's concept(s) from it and
    save the union of its tensors and this run's (a sequential erasure, docs/concepts.md)"""
    words: list[str] = dataclasses.field(default_factory=list)
    """prompts whose token vectors are erased (default: the concept table's words)"""
    guide: str | None = None
    """guide prompt whose keys and values the erased words receive (default, as official: 'art' for styles,
    '' otherwise)"""
    preserve: list[str] = dataclasses.field(default_factory=list)
    """prompts whose keys and values must not change (official default: none; its README preserves other
    artists when erasing one)"""
    erase_scale: float = 1.0
    """s_e of Eq. 2 (official: 1)"""
    preserve_scale: float = 1.0
    """s_p of Eq. 2 (official: 1)"""
    lam: float = 0.5
    """lambda of Eq. 2, the pull towards the original weights; it also keeps Eq. 3 invertible (official: 0.5)"""
    key_tokens: str = "last"
    """which token vectors of a prompt are edited: 'last' (the last word token, as the official
    uce_sd_erase.py) or 'tail' (from the last word token to the end of the padded prompt, paired
    position by position with the guide's, as the paper-era train_erase.py; preserved prompts then
    contribute every token)"""
    expand: bool = False
    """also erase the words inside templates ('painting by {}', 'photo of {}', ...; toy: the concept's caption
    templates), each guided to the guide in the same template (official --expand_prompts, default false)"""
    samples: list[str] = dataclasses.field(default_factory=list)
    """prompts for samples.png (default: a concept word, a held-out word, a near concept, the guide)"""
    sample_steps: int | None = None
    """DDIM steps of samples.png (default: the sampler's, 25 toy / 50 SD)"""
    mixed_precision: str = "no"
    """'no', 'fp16' or 'bf16': frozen copies and forward passes in half precision, trained weights and their
    optimizer state in fp32 (as diffusers' training examples do); the closed form is solved in fp32 either way"""
    device: str | None = None
    """'cuda' or 'cpu' (default: cuda when available)"""


# What each flag may be: checked by common.parse_args before anything loads (the rules: common.check_args).
LIMITS = dict(sample_steps="[1, 1000]", mixed_precision=("no", "fp16", "bf16"),
              output="erased-model output", words="non-empty", erase_scale=">= 0", preserve_scale=">= 0",
              lam="> 0", key_tokens=("last", "tail"),
              start_from="erased model")


# ---------------------------------------------------------------------------------------------
# Token vectors: the columns c of Eq. 2
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def token_vectors(pipe, prompts: list[str], which: str) -> list[torch.Tensor]:
    """Per prompt, rows of text-encoder hidden states: 'last' the last word token [1, D] (for '' that is
    the start token, as in the official code), 'tail' from there to the end of the padded prompt
    [L - i, D], 'all' every position [L, D]."""
    ids = common.tokenize(pipe, prompts)
    hidden = pipe.text_encoder(ids)[0].float()  # [B, L, D]
    last = (common.eos_index(pipe, ids) - 1).clamp_min(0).tolist()
    if which == "last":
        return [h[i:i + 1] for h, i in zip(hidden, last)]
    if which == "tail":
        return [h[i:] for h, i in zip(hidden, last)]
    return list(hidden)


def erase_and_guide_keys(pipe, erase_prompts: list[str], guide_prompts: list[str], key_tokens: str):
    """Erased token vectors c_i and their guide vectors c_i^g, paired row by row: [N, D] each. With
    'tail' both tails are cut to the shorter one, as the paper-era code does."""
    erase, guide = token_vectors(pipe, erase_prompts, key_tokens), token_vectors(pipe, guide_prompts, key_tokens)
    pairs = [(e[:min(len(e), len(g))], g[:min(len(e), len(g))]) for e, g in zip(erase, guide)]
    return torch.cat([e for e, _ in pairs]), torch.cat([g for _, g in pairs])


def edit_prompts(words: list[str], guide: str, templates: list[str]) -> tuple[list[str], list[str]]:
    """Each word paired with the guide, then (when templates are given) each template filled with the
    word, paired with the same template filled with the guide (official --expand_prompts)."""
    erase, target = list(words), [guide] * len(words)
    for word in words:
        erase += [t.format(word) for t in templates]
        target += [" ".join(t.format(guide).split()) for t in templates]  # 'a  thing' -> 'a thing': same tokens
    return erase, target


# ---------------------------------------------------------------------------------------------
# The closed form (Eqs. 2-3); realera.py carries its own copy, so that each file holds its whole method
# ---------------------------------------------------------------------------------------------
def closed_form_edit(W: torch.Tensor, erase_keys: torch.Tensor, target_values: torch.Tensor,
                     preserve_keys: torch.Tensor, preserve_scale: float, lam: float,
                     erase_scale: float = 1.0) -> torch.Tensor:
    """Eq. 3: the W* of Eq. 2 for one projection W0 = `W` [d_out, d_in] (no bias).

    erase_keys c_i as rows [n, d_in], target_values v*_i as rows [n, d_out] (Eq. 1), preserve_keys c_j as
    rows [m, d_in] (m may be 0); s_e = erase_scale, s_p = preserve_scale, lambda = lam. Returns W* [d_out,
    d_in] in W's dtype. The sums are accumulated as matrix products in float32 and W* = solve(G, R^T)^T
    with G = lambda I + ... the symmetric right-hand factor (the official code multiplies by
    torch.inverse(G)); lam > 0 makes G positive definite whatever the keys. Raises
    torch.linalg.LinAlgError if G is singular (only possible with lam = 0).
    """
    W0, keys, values = W.detach().float(), erase_keys.float(), target_values.float()
    kept = preserve_keys.float().reshape(-1, W0.shape[1])
    rhs = lam * W0 + erase_scale * values.T @ keys + preserve_scale * (W0 @ kept.T) @ kept  # R [d_out, d_in]
    gram = (lam * torch.eye(W0.shape[1], device=W0.device) + erase_scale * keys.T @ keys
            + preserve_scale * kept.T @ kept)  # G [d_in, d_in]
    return torch.linalg.solve(gram, rhs.T).T.to(W.dtype)


# ---------------------------------------------------------------------------------------------
# main: one closed-form solve per attn2.to_k / attn2.to_v
# ---------------------------------------------------------------------------------------------
def concept_prompts(args, info: dict) -> tuple[list[str], str, list[str], list[str]]:
    """One concept's words, guide, and erase / guide prompts (edit_prompts): --words, --guide if given, else the
    concept file's words and its "uce" anchor, else its kind's KIND_DEFAULTS row."""
    words = args.words or info["words"]
    defaults = KIND_DEFAULTS[info["kind"]]
    guide = args.guide if args.guide is not None else info["anchors"].get("uce", defaults["guide"])
    templates = []
    if args.expand:
        templates = [t for t in info["templates"] if t != "{}"] if args.model == "toy" else \
            EXPAND_TEMPLATES[defaults["expand"]]
    return (words, guide, *edit_prompts(words, guide, templates))


def main(argv=None):
    args = common.parse_args(Args, argv, limits=LIMITS)  # --lam > 0 keeps the closed form invertible
    infos = common.concept_set(args)  # one concept, or several erased in one solve
    common.several_concepts(infos, args)
    # Several concepts: their pairs are stacked into the one least-squares system of Eq. 2 (the paper's Sec. 4.1
    # erases up to 100 artists in one edit; official --concepts 'a; b'), each with its own kind's guide/templates.
    erase_prompts, guide_prompts, words_of, guide_of = [], [], {}, {}
    for info in infos:
        words_of[info["name"]], guide_of[info["name"]], erase, target = concept_prompts(args, info)
        erase_prompts, guide_prompts = erase_prompts + erase, guide_prompts + target
    info, words, guide = infos[0], words_of[infos[0]["name"]], guide_of[infos[0]["name"]]
    out = common.erased_output("uce", infos, args)
    pipe = common.load_pipeline(args.model, device=args.device, start_from=args.start_from)
    pipe.sample_steps = args.sample_steps
    start, profile = time.time(), {}

    with common.phase(profile, "caching", pipe.device):
        erase_keys, guide_keys = erase_and_guide_keys(pipe, erase_prompts, guide_prompts, args.key_tokens)  # [N, D]
        preserve_tokens = "last" if args.key_tokens == "last" else "all"
        preserve_keys = torch.cat(token_vectors(pipe, args.preserve, preserve_tokens)) if args.preserve else \
            erase_keys.new_zeros(0, erase_keys.shape[1])  # [M, D]
    unet = copy.deepcopy(pipe.unet)
    common.set_mixed_precision(pipe, args.mixed_precision)  # after the copy: the edited U-Net stays fp32
    projections = common.attn2_projections(unet)
    with common.phase(profile, "training", pipe.device), torch.no_grad():
        for name, layer in tqdm(projections, desc="UCE closed form"):
            W0 = layer.weight
            target_values = guide_keys @ W0.float().T  # Eq. 1, v*_i = W0 c_i^g as rows [N, d_out]
            W_new = closed_form_edit(W0, erase_keys, target_values, preserve_keys, args.preserve_scale, args.lam,
                                     args.erase_scale)
            if not torch.isfinite(W_new).all():
                common.die(f"the closed form of {name} is not finite; nothing was written. Raise --lam.")
            layer.weight.copy_(W_new)
    seconds = time.time() - start

    print(f"erased {len(erase_keys)} token vectors ({len(erase_prompts)} prompts, {len(infos)} concept(s)) towards "
          f"'{guide}', preserving {len(preserve_keys)}, in {len(projections)} projections, {seconds:.1f} s")
    sample_prompts = args.samples or [info["templates"][1].format(w) for w in
                                      [words[0], *info["held_out"][:1], *info["near"][:1]]] + (
        [info["templates"][1].format(guide)] if guide.strip() else [])
    if len(infos) > 1 and not args.samples:  # one picture per erased concept
        sample_prompts = [i["templates"][1].format(words_of[i["name"]][0]) for i in infos]
        words, guide = words_of, guide_of  # config.json: each concept's words and guide
    with common.phase(profile, "samples", pipe.device):
        samples = common.before_after(pipe, sample_prompts, list(range(len(sample_prompts))), unet=unet)
    tensors = common.changed_tensors("unet", unet, pipe.unet)
    saved = common.save_erased(out, tensors, "uce", args, pipe, seconds, samples,
                               extra=dict(words=words, guide=guide, erase_prompts=erase_prompts,
                                          guide_prompts=guide_prompts, erased_token_vectors=len(erase_keys),
                                          preserved_token_vectors=len(preserve_keys),
                                          peak_memory_mb=common.profile_peak(profile), profile=profile))
    print(f"wrote {saved} ({len(tensors)} tensors changed)")


if __name__ == "__main__":
    main()
