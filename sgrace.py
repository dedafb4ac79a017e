"""S-GRACE: semantics-guided robust adversarial concept erasure (docs/sgrace.md).

Paper: "Rethinking Robust Adversarial Concept Erasure in Diffusion Models", Qinghong Yin, Yu Tian,
Heming Yang, Xiang Chen, Xianlin Zhang, Xueming Li, Yue Zhan. arXiv:2510.27285.
Official code: github.com/Qhong-522/S-GRACE (train.py, utils.py, configs/*.yml).

Idea. Adversarial erasure (AdvUnlearn) attacks the model with adversarial prompt embeddings and
erases whatever the attack finds, but its samples ignore the concept's semantics: a few samples do
not cover the concept, many samples hit other concepts. S-GRACE seeds its adversarial samples with
words *related* to the concept, adds a term that keeps the attack inside the concept's feature
space, erases in the *text encoder* by pushing the adversarial features away from the concept
feature, and retains with words that co-occur with the concept but are *unrelated* to it. Only the
text encoder's transformer layers are trained; the erased encoder is a drop-in replacement.

Equations (numbered as in docs/sgrace.md; E_0 frozen, E_theta trained text encoder, W the CLIP text
projection, h_L the hidden state at the last adversarial token of sample e_k, x_T the one noise):
  (1) f_c    = W h_EOT(E_0(c))                                                 concept_feature
  (2) e_0 = c;  e_k = [r random ids] + ",".join(sample(R, n)),  k = 1..K-1     copycat_sample
  (3) z = DDIM_{50}(x_T, "a photo of c", guidance 3) after int(t/1000*50) steps, t ~ U[750, 950)
                                                                               few_shot_latent
  (4) L_atk  = mean_k ||eps_U(z, t, E_theta(e_k)) - x_T||^2
               + lambda_s (1 - mean_k cos(W h_L(E_theta(e_k)), f_c))            attack_loss
      e <- Adam(e, sign(dL_atk/de)), 10 steps per round                       attack
  (5) L_push = 1 + mean_k cos(f_k, f_c),  f_k = W h_L(E_theta(e_k))            push_loss
  (6) L_keep = 1 - mean_k cos(f_k, f_k^0)   (f_k^0: right after the attack)    keep_loss
  (7) L_par  = sum_tensors mean|theta - theta_0|                               param_loss
  (8) L_anc  = ||E_theta(a) - E_0(a)||^2,  a = template(u), u ~ U             anchor_loss
      theta <- Adam(theta, L_push + w_sim L_keep + w_par L_par + w_anc L_anc), 50 steps per round
Rounds: attack, then erase, 4 times; from round 2 each sample is re-drawn with probability p_update.
"""
import dataclasses
import random
import re
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
    """erased-model folder (default: outputs/sgrace-<concept>)"""
    start_from: str | None = None
    """an erased-model folder of the same --model to start from: erase this run's concept(s) from it and
    save the union of its tensors and this run's (a sequential erasure, docs/concepts.md)"""
    related: str | None = None
    """text file of words related to the concept, one per line (R; default: the concept file's 'related', the
    built-in list, else the nearest word-final vocabulary tokens)"""
    unrelated: str | None = None
    """text file of words that co-occur with the concept but are unrelated to it, one per line (U, the anchors;
    default: the concept file's 'unrelated', the built-in list, else the farthest word-final vocabulary tokens)"""
    fallback_words: int = 50
    """how many nearest / farthest word-final vocabulary tokens make R / U when no list is known (official LLM
    lists: 50)"""
    projection: str = "auto"
    """CLIP text projection W: a CLIP model (hub id or path) whose text_projection is used, or 'none' for
    the identity; 'auto' = openai/clip-vit-large-patch14 for SD, identity for toy"""
    prompt: str | None = None
    """prompt of the few-shot latent (default as official: 'a photo of c' objects, 'a picture of c' styles, c for
    nudity; c is the concept's first word)"""
    rounds: int = 4
    """attack-then-erase rounds (official training_rounds: 4)"""
    adv_samples: int = 8
    """adversarial samples K (official adv.embeddings_nums: 8)"""
    init: str = "copycat"
    """'copycat' (Eq. 2, related words) or 'target' (random ids + the concept, AdvUnlearn-like)"""
    random_ids: int | None = None
    """random token ids in front of each sample (official: 5 nudity, 0 church / van gogh)"""
    min_words: int | None = None
    """fewest related words per sample (official: 3)"""
    max_words: int | None = None
    """most related words per sample (official: 10 nudity, 20 church / van gogh)"""
    separator: str = ","
    """what joins the related words of a sample (official: ',')"""
    p_update: float | None = None
    """chance that a sample is re-drawn at the start of rounds 2.. (official: 0.8 nudity, 0.15 others)"""
    attack_steps: int = 10
    """attack steps per round (official adv.steps: 10)"""
    adv_lr: float | None = None
    """Adam learning rate of the signed attack (official: 0.005)"""
    semantic_weight: float = 0.1
    """lambda_s, weight of the concept-similarity term of the attack (official: 0.1; 0 = no semantic term)"""
    pgd_radius: float = 0.0
    """L-inf radius of a projection of each round's attack around its start; 0 = unconstrained, the
    effective official behaviour (its projection is a no-op; it meant 4 x adv_lr)"""
    feature_token: str = "last"
    """where a sample's feature is read: 'last' adversarial token (official) or 'eot' (CLIP's pooled position)"""
    erase_steps: int = 50
    """erasure steps per round (official edit.steps: 50)"""
    lr: float = 1e-5
    """Adam learning rate of the text encoder (official: 1e-5)"""
    erase_loss: str = "feature"
    """'feature' (S-GRACE, Eq. 5-6) or 'esd' (AdvUnlearn-style: the ESD target on the U-Net's output)"""
    negative_guidance: float = 1.0
    """eta of the 'esd' erase loss: target eps(z,'') - eta (eps(z,c) - eps(z,''))"""
    w_sim: float | None = None
    """weight of the keep-own-semantics term (official: 1.2 nudity / van gogh, 1 church)"""
    w_param: float | None = None
    """weight of the L1 distance to the initial weights (official: 0.3 nudity, 0.2 others)"""
    w_anchor: float | None = None
    """weight of the anchor hidden-state retention (official: 1.2 nudity, 1 others)"""
    n_anchors: int | None = None
    """anchor words sampled from U per erasure step (official: 16 nudity, 8 others)"""
    timestep_low: int = 750
    """lowest DDPM timestep t of the few-shot latent (official: 750)"""
    timestep_high: int = 950
    """t is drawn from [low, high) (official: 950)"""
    latent_steps: int = 50
    """DDIM steps of the schedule the few-shot latent is drawn on (official: 50)"""
    latent_guidance: float = 3.0
    """guidance of the few-shot latent (official: 3)"""
    true_timestep: bool = False
    """query the U-Net at the timestep the latent is at, not at the official label t (ESD's convention)"""
    few_shot: bool = True
    """one fixed latent for the whole run (official); --no_few_shot draws a new one every round"""
    unet_batch: int = 4
    """adversarial samples per U-Net call in the attack (memory only; official: 4)"""
    samples: list[str] = dataclasses.field(default_factory=list)
    """prompts for samples.png (default: a concept word, a held-out word, a near concept); the number of
    adversarial samples K is --adv_samples"""
    sample_steps: int | None = None
    """DDIM steps of samples.png (default: the sampler's, 25 toy / 50 SD)"""
    mixed_precision: str = "no"
    """'no', 'fp16' or 'bf16': frozen copies and forward passes in half precision, trained weights and their
    optimizer state in fp32 (as diffusers' training examples do)"""
    seed: int = 3407
    """random seed; also the noise x_T (official seed_train: 3407)"""
    device: str | None = None
    """'cuda' or 'cpu' (default: cuda when available)"""


# Official configs/*.yml, by concept: (kind of prompt, adv_lr, p_update, random_ids, words min-max,
# w_sim, w_anchor, n_anchors, w_param). parachute.yml names no anchor_nums: the default 8 is used.
SETTINGS = {
    "nudity": ("harmful", 0.005, 0.8, 5, (3, 10), 1.2, 1.2, 16, 0.3),
    "van gogh": ("style", 0.005, 0.15, 0, (3, 20), 1.2, 1.0, 8, 0.2),
    "church": ("object", 0.005, 0.15, 0, (3, 20), 1.0, 1.0, 8, 0.2),
    "parachute": ("object", 0.005, 0.15, 0, (3, 20), 1.2, 1.0, 8, 0.2),
    "garbage truck": ("object", 0.005, 0.15, 3, (3, 10), 1.5, 1.5, 8, 0.3),
    "tench": ("object", 0.005, 0.15, 3, (3, 10), 1.5, 1.5, 8, 0.3),
    "picasso": ("style", 0.01, 0.15, 3, (3, 10), 1.1, 2.0, 8, 0.3),
    "violence": ("harmful", 0.005, 0.15, 5, (3, 10), 1.1, 1.2, 8, 0.3),
}
# R and U for the SD concepts are the 'related' / 'unrelated' lists of their concept files (concepts/*.json),
# written for this repository (the official lists are GPT-4 answers). They leave out the evaluation's held-out
# words (chapel, cathedral, topless, ...) and near concepts.
# A concept SETTINGS does not list takes the row of its kind's benchmark concept in the paper: church for
# objects (and the miniature world's objects and colours, whose TOY_DEFAULTS override it anyway), van gogh for
# styles (the paper's style benchmark; picasso.yml is the other style config), nudity for nudity.
KIND_ROWS = {"object": "church", "style": "van gogh", "nudity": "nudity", "colour": "church"}
# The kind of latent prompt (SETTINGS' first column) a concept of each kind has: a concept's own SETTINGS row is
# used only when it agrees, so --kind (or a concept file's kind) beats the row its name would pick.
PROMPT_KINDS = {"object": "object", "style": "style", "nudity": "harmful", "colour": "object"}
ANCHOR_TEMPLATES = ["a photo of {}", "a picture of {}", "a image of {}"]  # official, chosen at random per anchor

# --model toy: lr and rounds checked by docs/budgets.md's rule on the development concepts (kept by its fallback).
# The toy's token embeddings have std ~1 (SD's ~0.014), hence the larger attack step.
TOY_DEFAULTS = dict(rounds=8, adv_samples=8, random_ids=1, min_words=1, max_words=3, separator=" ", p_update=0.3,
                    adv_lr=0.3, lr=1e-3, w_sim=1.0, w_param=0.2, w_anchor=1.0, n_anchors=8, latent_steps=25)
# What each flag may be: checked by common.parse_args before anything loads (the rules: common.check_args).
# --random_ids stops at 20 so that a sample still fits the miniature model's 24 tokens.
LIMITS = dict(sample_steps="[1, 1000]", mixed_precision=("no", "fp16", "bf16"),
              output="erased-model output", related="file", unrelated="file", fallback_words=">= 1", rounds=">= 1",
              adv_samples=">= 1", init=("copycat", "target"), random_ids="[0, 20]", min_words=">= 1", max_words=">= 1",
              p_update="[0, 1]", attack_steps=">= 0", adv_lr="> 0", semantic_weight=">= 0", pgd_radius=">= 0",
              feature_token=("last", "eot"), erase_steps=">= 1", lr="> 0", erase_loss=("feature", "esd"),
              negative_guidance=">= 0", w_sim=">= 0", w_param=">= 0", w_anchor=">= 0", n_anchors=">= 1",
              timestep_low="[0, 999]", timestep_high="[1, 1000]", latent_steps="[1, 1000]", latent_guidance=">= 0",
              unet_batch=">= 1", seed="[0, 4294967295]",
              start_from="erased model")


# ---------------------------------------------------------------------------------------------
# The concept: settings, word lists (R, U), feature f_c
# ---------------------------------------------------------------------------------------------
def concept_settings(args, info: dict) -> dict:
    """The concept's row of SETTINGS, else its kind's (KIND_ROWS), under explicit flags. The concept's own row
    counts only when its prompt kind agrees with the concept's kind (PROMPT_KINDS), so a flag beats the table:
    `--concept church --kind style` takes van gogh's row, `--concept parachute --kind object` parachute's. 'row'
    names the row used and 'kind' the kind of latent prompt (harmful, style, object). Stops with one sentence for
    a kind without a row."""
    own = SETTINGS.get(info["name"])
    agrees = own is not None and own[0] == PROMPT_KINDS.get(info["kind"])
    row = info["name"] if agrees else KIND_ROWS.get(info["kind"])
    if row is None:
        common.die(f"S-GRACE has no settings for a concept of kind '{info['kind']}'; pass --kind "
                   f"({', '.join(k for k in KIND_ROWS if k != 'colour')}).")
    kind, adv_lr, p_update, random_ids, (lo, hi), w_sim, w_anchor, n_anchors, w_param = SETTINGS[row]
    table = dict(kind=kind, adv_lr=adv_lr, p_update=p_update, random_ids=random_ids, min_words=lo, max_words=hi,
                 w_sim=w_sim, w_anchor=w_anchor, n_anchors=n_anchors, w_param=w_param)
    # every value but the prompt kind has a flag of the same name (--kind is the concept's kind, already in the row)
    return dict(row=row, **{k: (getattr(args, k) if k != "kind" and getattr(args, k, None) is not None else v)
                            for k, v in table.items()})


def toy_word_lists(info: dict) -> tuple[list[str], list[str]]:
    """R = the concept's own (training) words. U = what appears with it in the world's captions but is
    not it: the other kind's words, sizes, backgrounds, and the other concepts of its kind and the anchor."""
    import json

    world = json.loads(common.WORLD_FILE.read_text())
    other_kind = "colours" if info["kind"] == "object" else "objects"
    co_occurring = [e["words"][0] for e in world[other_kind].values()]
    co_occurring += [w for g in ("sizes", "backgrounds") for ws in world[g].values() for w in ws]
    return list(info["words"]), list(dict.fromkeys(co_occurring + info["others"] + [info["anchor"]]))


def token_pieces(tokenizer, texts: list[str]) -> set[str]:
    """The pieces the tokenizer splits `texts` into, lowercased, without CLIP's end-of-word mark '</w>'
    ("nudity" -> {"nu", "dity"})."""
    return {t.lower().removesuffix("</w>") for text in texts for t in tokenizer.tokenize(text)}


def vocabulary_neighbours(pipe, concept: str, n: int, exclude: list[str]) -> tuple[list[str], list[str]]:
    """Fallback R / U: the n word-final vocabulary tokens nearest to / farthest from the concept's mean token
    embedding (cosine), as plain text. A candidate is a token that ends a word (CLIP BPE: '</w>'; every token of a
    word-level vocabulary such as the toy's), of 3+ lower-case letters, and none of the pieces the tokenizer
    splits the concept or an `exclude` word (its synonyms, its held-out evaluation words) into: for "nudity",
    neither "nu" nor "dity" can enter R or U. Not every candidate is a word: CLIP's vocabulary also holds the
    endings of longer words ('lish' of 'english', 'ourable'), and no offline test tells them apart; each of
    CLIP's 32,230 candidates encodes alone to exactly its own one token, 'lish</w>' as 'church</w>' does. A
    concept file's 'related' / 'unrelated' lists are the clean source. Returns (R, U), n entries each at most."""
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    tok = pipe.tokenizer
    concept_ids = [i for i in common.tokenize(pipe, [concept])[0].tolist() if i not in tok.all_special_ids]
    cos = F.cosine_similarity(table, table[concept_ids].mean(0, keepdim=True), dim=-1)
    banned = token_pieces(tok, [concept, *exclude]) | {w.lower() for e in exclude for w in e.split()}
    bpe = any(t.endswith("</w>") for t in tok.get_vocab())
    words = []
    for i in cos.argsort(descending=True).tolist():
        token = tok.convert_ids_to_tokens(i)
        word = token.removesuffix("</w>")
        if (i not in tok.all_special_ids and (token.endswith("</w>") or not bpe) and re.fullmatch(r"[a-z]{3,}", word)
                and word not in banned):
            words.append(word)
    return words[:n], words[::-1][:n]


def read_words(path: str) -> list[str]:
    try:
        words = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError:
        common.die(f"cannot read the word list {path}.")
    return words or common.die(f"the word list {path} is empty.")


def word_lists(args, pipe, info: dict) -> tuple[list[str], list[str]]:
    """R (with the concept itself first, as official: it is e_0) and U, each from the first source that has
    it: --related / --unrelated, the concept file's 'related' / 'unrelated', the miniature world's lists, and
    last the vocabulary fallback. The concept itself is its first word, info['words'][0] (concept_text).
    Entries of R that differ only in case are one entry (CLIP lower-cases): the first is kept."""
    concept = concept_text(info)
    built_in = toy_word_lists(info) if args.model == "toy" else (None, None)
    related = read_words(args.related) if args.related else info.get("related") or built_in[0]
    unrelated = read_words(args.unrelated) if args.unrelated else info.get("unrelated") or built_in[1]
    if not related or not unrelated:
        nearest, farthest = vocabulary_neighbours(pipe, concept, args.fallback_words,
                                                  [*info["words"], *info["held_out"]])
        related, unrelated = related or nearest, unrelated or farthest
    first = {}
    for word in [concept, *related]:
        first.setdefault(word.lower(), word)
    return list(first.values()), list(unrelated)


def load_projection(args, pipe):
    """W of Eq. (1): CLIP's text projection (SD v1.4's encoder is CLIP ViT-L/14's), or the identity."""
    source = args.projection if args.projection != "auto" else ("none" if args.model == "toy" else "openai/clip-vit-large-patch14")
    if source == "none":
        return lambda hidden: hidden
    from transformers import CLIPTextModelWithProjection

    try:
        model = CLIPTextModelWithProjection.from_pretrained(source, local_files_only=True)
    except Exception:
        try:
            if not common.hub_reachable():
                raise OSError("offline")
            model = CLIPTextModelWithProjection.from_pretrained(source)
        except Exception:
            common.die(f"could not load the CLIP text projection from '{source}'; pass a local copy with "
                       "--projection /path/to/clip-vit-large-patch14, or --projection none for the identity.")
    return model.text_projection.requires_grad_(False).to(pipe.device, pipe.text_encoder.dtype)


def concept_text(info: dict) -> str:
    """The text S-GRACE erases, what the official code calls the concept (config `concept`, in f_c, the latent
    prompt and R's first entry): the concept's first word. The name only names things (output folder, reports):
    a concept file {"name": "x", "words": ["teapot"]} erases "teapot"."""
    return info["words"][0]


@torch.no_grad()
def concept_feature(pipe, projection, concept: str) -> torch.Tensor:
    """Eq. (1): f_c, the frozen encoder's end-of-text feature of the bare concept, projected [1, D']."""
    return projection(common.pooled_features(pipe, [concept]))


# ---------------------------------------------------------------------------------------------
# Adversarial samples: token ids, their (optimised) token embeddings, the feature position
# ---------------------------------------------------------------------------------------------
def sample_ids(pipe, words: list[str], n_random: int, separator: str, banned=frozenset()) -> tuple[torch.Tensor, int]:
    """[SOT] + n_random random ids + the tokens of the joined words + [EOT] + padding, and the index
    of the last adversarial token (official: at most max_length - 2 adversarial tokens)."""
    tok, n = pipe.tokenizer, pipe.tokenizer.model_max_length
    ids = common.tokenize(pipe, [separator.join(words)])[0]
    # the tokenizer has cut the words to n - 2 tokens; keep n - 2 - n_random (official: [:-(len + r - 75)],
    # which keeps none when len + r is exactly 75, see docs: "token limit")
    inner = ids[1:common.eos_index(pipe, ids[None])[0]][: n - 2 - n_random]
    # official: torch.randint(0, 40905), torch's generator, not Python's; special and `banned` ids are re-drawn
    random_ids = torch.randint(0, min(40905, len(tok)), (n_random,))
    refused = set(tok.all_special_ids) | set(banned)
    while bad := [k for k, i in enumerate(random_ids.tolist()) if i in refused]:
        random_ids[bad] = torch.randint(0, min(40905, len(tok)), (len(bad),))
    random_ids = random_ids.to(ids.dtype).to(ids.device)
    body = torch.cat([ids[:1], random_ids, inner, ids.new_tensor([tok.eos_token_id])])
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return torch.cat([body, ids.new_full((n - len(body),), pad)]), len(body) - 2


def copycat_sample(pipe, related: list[str], index: int, n_words: int, settings: dict, args):
    """Eq. (2). 'copycat': e_0 is the bare concept, e_k a random pick of related words after random ids;
    'target': random ids before the concept (the official alternative, AdvUnlearn's prefix attack)."""
    if args.init == "target":
        return sample_ids(pipe, [related[0]], settings["random_ids"], args.separator, settings.get("banned_ids", frozenset()))
    if index == 0:  # official: random.sample([c], 1), a draw of Python's random that a seed must spend here too
        return sample_ids(pipe, random.sample(related[:1], 1), 0, args.separator)
    return sample_ids(pipe, random.sample(related, min(n_words, len(related))), settings["random_ids"], args.separator,
                      settings.get("banned_ids", frozenset()))


def draw_samples(pipe, related, settings, args, old=None):
    """All K samples (old=None), or the old ones with each re-drawn with probability p_update, which
    keeps the optimised embeddings of the others. Returns ids [K, N], token embeddings [K, N, D] and
    the last adversarial index [K]. As official, one word count is drawn per call, and a re-drawn
    sample is always a copycat sample (even e_0)."""
    n_words = random.randint(settings["min_words"], settings["max_words"])
    table = pipe.text_encoder.get_input_embeddings()
    ids, embeds, last = (list(x) for x in old) if old is not None else ([None] * args.adv_samples for _ in range(3))
    for k in range(args.adv_samples):
        if old is None or random.random() < settings["p_update"]:
            ids[k], last[k] = copycat_sample(pipe, related, k if old is None else 1, n_words, settings, args)
            embeds[k] = table(ids[k]).detach()
    return torch.stack(ids), torch.stack(embeds), torch.as_tensor(last, device=pipe.device)


def sample_features(text_encoder, projection, embeds, last, feature_token: str):
    """f_k = W h_L(E(e_k)): the hidden state at the last adversarial token (official) or at EOT."""
    hidden = common.text_forward(text_encoder, embeds)  # [K, N, D]
    position = last + (1 if feature_token == "eot" else 0)
    return hidden, projection(hidden[torch.arange(len(embeds), device=embeds.device), position])


# ---------------------------------------------------------------------------------------------
# The few-shot latent, the attack, the erasure losses
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def few_shot_latent(pipe, prompt: str, args, seed: int):
    """Eq. (3): x_T (seed), t ~ U[low, high), z after int(t/1000*steps) DDIM steps on the prompt.
    Returns x_T, z and the timestep the U-Net is queried at (t, or z's true timestep)."""
    t = random.randrange(args.timestep_low, args.timestep_high)
    stop = int(t / 1000 * args.latent_steps)
    x_T = common.initial_latents(pipe, [seed])
    z, t_true = common.sample_until(pipe, common.encode(pipe, [prompt]), common.encode(pipe, [""]), [seed],
                                    args.latent_steps, stop, args.latent_guidance)
    return x_T, z, (t_true if args.true_timestep else t)


def cosine_to(features, target):
    return F.cosine_similarity(features, target.expand_as(features), dim=-1)


def reconstruction_loss(eps, x_T):
    """Eq. (4), first term: the U-Net, conditioned on the sample, predicts the noise x_T."""
    return F.mse_loss(eps, x_T.expand_as(eps))


def concept_similarity_loss(features, f_c):
    """Eq. (4), second term: 1 - mean cosine to the concept feature (keeps the attack in the concept)."""
    return 1 - cosine_to(features, f_c).mean()


def attack_loss(eps, x_T, features, f_c, semantic_weight: float):
    """Eq. (4)."""
    return reconstruction_loss(eps, x_T) + semantic_weight * concept_similarity_loss(features, f_c)


def attack(text_encoder, unet, projection, embeds, mask, last, z, t, x_T, f_c, lr, args):
    """Eq. (4) by signed Adam on the adversarial token embeddings only (mask [K, N]). The U-Net term is
    summed over chunks of args.unet_batch samples (memory). Returns the new embeddings and the loss."""
    embeds = embeds.clone().requires_grad_(True)
    optimizer, start, k = torch.optim.Adam([embeds], lr=lr), embeds.detach().clone(), len(embeds)
    for _ in range(args.attack_steps):
        grad, loss_value = torch.zeros_like(embeds), 0.0
        for i in range(0, k, args.unet_batch):
            chunk = embeds[i:i + args.unet_batch]
            eps = unet(z.expand(len(chunk), -1, -1, -1), t,
                       encoder_hidden_states=common.text_forward(text_encoder, chunk)).sample
            loss = reconstruction_loss(eps, x_T) * len(chunk) / k  # chunks add up to the mean over K
            grad += torch.autograd.grad(loss, embeds)[0]
            loss_value += loss.item()
        if args.semantic_weight:
            _, features = sample_features(text_encoder, projection, embeds, last, args.feature_token)
            loss = args.semantic_weight * concept_similarity_loss(features, f_c)
            grad += torch.autograd.grad(loss, embeds)[0]
            loss_value += loss.item()
        if not torch.isfinite(torch.tensor(loss_value)):
            common.die("the attack loss became NaN; nothing was written. Lower --adv_lr.")
        embeds.grad = (grad * mask[..., None]).sign()  # SOT, EOT and padding never move
        optimizer.step()
        if args.pgd_radius > 0:  # what the official code meant to do: an L-inf ball around the round's start
            with torch.no_grad():
                embeds.copy_(start + (embeds - start).clamp(-args.pgd_radius, args.pgd_radius))
    return embeds.detach(), loss_value


def push_loss(features, f_c):
    """Eq. (5): in [0, 2]; 0 when every adversarial feature points away from the concept."""
    return 1 + cosine_to(features, f_c).mean()


def keep_loss(features, features_0):
    """Eq. (6): each sample keeps its own direction (row-wise cosine with its post-attack feature)."""
    return 1 - F.cosine_similarity(features, features_0, dim=-1).mean()


def param_loss(params, params_0):
    """Eq. (7): sum over tensors of the mean absolute change (official torch.nn.L1Loss per tensor)."""
    return sum((p - p0).abs().mean() for p, p0 in zip(params, params_0))


def anchor_loss(hidden, hidden_0):
    """Eq. (8): all token hidden states of the anchor prompts stay where the frozen encoder puts them."""
    return F.mse_loss(hidden, hidden_0)


# ---------------------------------------------------------------------------------------------
# main: word lists, samples, latent, then rounds of attack and erasure
# ---------------------------------------------------------------------------------------------
def trainable(name: str) -> bool:
    """The official 'base' choice: the transformer layers and the final layer norm, not the embeddings."""
    return re.search(r"(^|\.)(encoder|final_layer_norm)\.", name) is not None


def train(args, pipe, profile: dict):
    """The S-GRACE loop; returns the trained text encoder and a dict of timings and choices. Records the
    peak memory and seconds of its phases, and each round's seconds, in `profile`."""
    for name, value, allowed in [("init", args.init, ("copycat", "target")), ("feature_token", args.feature_token, ("last", "eot")),
                                 ("erase_loss", args.erase_loss, ("feature", "esd"))]:
        if value not in allowed:
            common.die(f"--{name} must be one of {', '.join(allowed)}, not '{value}'.")
    infos = common.concept_set(args)  # one concept, or several erased together
    with common.phase(profile, "caching", pipe.device):
        projection = load_projection(args, pipe)
        states = [concept_state(args, pipe, info, projection) for info in infos]
    if len(infos) > 1:  # U keeps what lies outside the set: no concept's words may be an anchor of another's
        erased = {w.lower() for state in states for w in state["related"]}
        for state in states:
            state["unrelated"] = [u for u in state["unrelated"] if u.lower() not in erased]
    pick = random.Random(args.seed)  # which concept a round attacks and erases (several concepts only)

    text_encoder = common.trainable_copy(pipe.text_encoder, trainable)
    scaler = common.set_mixed_precision(pipe, args.mixed_precision)  # after the copy: it stays fp32
    params = [p for p in text_encoder.parameters() if p.requires_grad]
    params_0 = [p.detach().clone() for p in params]
    optimizer = torch.optim.Adam(params, lr=args.lr)
    timings = dict(attack_seconds=0.0, erase_seconds=0.0)
    logs = {}
    bar = tqdm(total=args.rounds * (args.attack_steps + args.erase_steps), desc="S-GRACE")
    with common.phase(profile, "training", pipe.device), common.autocast(pipe):
        for round_index in common.timed(range(args.rounds), profile, pipe.device):
            tick = time.time()
            # several concepts (our extension): each round draws one, with its own samples, latent and lists
            state = states[0] if len(states) == 1 else states[pick.randrange(len(states))]
            settings, related, unrelated, prompt, f_c = (state[k] for k in ("settings", "related", "unrelated",
                                                                            "prompt", "f_c"))
            adversarial, latent = state["adversarial"], state["latent"]
            adversarial = draw_samples(pipe, related, settings, args, old=adversarial)
            ids, embeds, last = adversarial
            positions = torch.arange(ids.shape[1], device=ids.device)
            mask = (positions[None] >= 1) & (positions[None] <= last[:, None])  # the adversarial tokens
            if latent is None or not args.few_shot:
                latent = few_shot_latent(pipe, prompt, args, args.seed + (0 if args.few_shot else round_index))
                x_T, z, t = latent
                if args.erase_loss == "esd":
                    with torch.no_grad():
                        eps_u, eps_c = pipe.unet(torch.cat([z, z]), t, encoder_hidden_states=common.encode(pipe, ["", prompt])).sample.chunk(2)
                    state["eps_target"] = eps_u - args.negative_guidance * (eps_c - eps_u)
            x_T, z, t = latent
            eps_target = state.get("eps_target")
            embeds, loss_atk = attack(text_encoder, pipe.unet, projection, embeds, mask, last, z, t, x_T, f_c,
                                      settings["adv_lr"], args)
            adversarial = (ids, embeds, last)  # the optimised embeddings persist into the next round (official)
            state.update(adversarial=adversarial, latent=latent)
            with torch.no_grad():
                _, features_0 = sample_features(text_encoder, projection, embeds, last, args.feature_token)
            bar.update(args.attack_steps)
            timings["attack_seconds"] += time.time() - tick

            tick = time.time()
            for _ in range(args.erase_steps):
                hidden, features = sample_features(text_encoder, projection, embeds, last, args.feature_token)
                if args.erase_loss == "esd":
                    eps = pipe.unet(z.expand(len(embeds), -1, -1, -1), t, encoder_hidden_states=hidden).sample
                    loss_erase = F.mse_loss(eps, eps_target.expand_as(eps))
                else:
                    loss_erase = push_loss(features, f_c) + settings["w_sim"] * keep_loss(features, features_0)
                anchors = [random.choice(ANCHOR_TEMPLATES).format(u)
                           for u in random.sample(unrelated, min(settings["n_anchors"], len(unrelated)))]
                with torch.no_grad():
                    hidden_0 = common.encode(pipe, anchors)
                loss_anc = anchor_loss(common.encode(pipe, anchors, text_encoder), hidden_0)
                loss_par = param_loss(params, params_0)
                loss = loss_erase + settings["w_param"] * loss_par + settings["w_anchor"] * loss_anc
                if not torch.isfinite(loss):
                    common.die(f"the erasure loss became NaN in round {round_index + 1}; nothing was written. Lower --lr.")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                with torch.no_grad():
                    similarity = cosine_to(features, f_c).mean().item()
                logs = dict(round=round_index + 1, attack=f"{loss_atk:.3f}", erase=f"{loss_erase.item():.3f}",
                            cos_c=f"{similarity:.3f}", anchor=f"{loss_anc.item():.4f}", l1=f"{loss_par.item():.4f}")
                bar.set_postfix(logs)
                bar.update(1)
            timings["erase_seconds"] += time.time() - tick
    bar.close()
    common.release(optimizer)
    text_encoder.eval().requires_grad_(False)
    described = [dict(prompt=state["prompt"], settings={k: v for k, v in state["settings"].items() if k != "banned_ids"},
                      related=state["related"], unrelated=state["unrelated"]) for state in states]
    per_concept = described[0] if len(states) == 1 else dict(concepts_settings=dict(zip([i["name"] for i in infos], described)))
    return text_encoder, dict(**{k: round(v, 2) for k, v in timings.items()}, **per_concept, last_losses=logs)


def concept_state(args, pipe, info: dict, projection) -> dict:
    """What a round needs about one concept (its text: concept_text, the first word): its settings (SETTINGS row
    under the flags, and the token ids random ids must avoid), R and U, the latent prompt, f_c (Eq. 1); its
    adversarial samples and latent start empty and persist from round to round."""
    concept = concept_text(info)
    settings = concept_settings(args, info)
    # random ids never draw a held-out evaluation word's tokens (that would train on the generality test)
    held_out_ids = common.tokenize(pipe, info["held_out"]).flatten().tolist() if info["held_out"] else []
    settings["banned_ids"] = frozenset(held_out_ids) - set(pipe.tokenizer.all_special_ids)
    related, unrelated = word_lists(args, pipe, info)
    toy_prompt = info["templates"][-1].format(concept) if args.model == "toy" else None
    prompt = args.prompt or toy_prompt or {"style": "a picture of {}", "harmful": "{}"}.get(settings["kind"], "a photo of {}").format(concept)
    return dict(settings=settings, related=related, unrelated=unrelated, prompt=prompt,
                f_c=concept_feature(pipe, projection, concept), adversarial=None, latent=None)


def main(argv=None):
    args = common.parse_args(Args, argv, toy_defaults=TOY_DEFAULTS, limits=LIMITS)
    number = next((p.strip() for p in args.samples if re.fullmatch(r"\s*\d+\s*", p)), None)
    if number is not None:  # an old command: --samples was the number of adversarial samples K before --adv_samples
        common.die(f"--samples takes the prompts of samples.png, not a number; for {number} adversarial samples "
                   f"write --adv_samples {number}.")
    infos = common.concept_set(args)  # one concept, or several erased together
    common.several_concepts(infos, args, ("related", "unrelated", "prompt"))
    info = infos[0]
    for settings in [concept_settings(args, i) for i in infos]:
        if settings["min_words"] > settings["max_words"]:
            common.die(f"--min_words {settings['min_words']} is above --max_words {settings['max_words']}.")
    if args.timestep_low >= args.timestep_high:
        common.die(f"t is drawn from [--timestep_low, --timestep_high), so {args.timestep_low} must be below "
                   f"{args.timestep_high}.")
    out = common.erased_output("sgrace", infos, args)
    common.seed_everything(args.seed)
    pipe = common.load_pipeline(args.model, device=args.device, start_from=args.start_from)
    pipe.sample_steps = args.sample_steps
    start, profile = time.time(), {}
    text_encoder, extra = train(args, pipe, profile)
    seconds = time.time() - start
    sample_prompts = args.samples or [info["templates"][1].format(w) for w in
                                      [info["words"][0], *info["held_out"][:1], *info["near"][:1]]]
    if len(infos) > 1 and not args.samples:  # one picture per erased concept
        sample_prompts = [i["templates"][1].format(i["words"][0]) for i in infos]
    with common.phase(profile, "samples", pipe.device):
        samples = common.before_after(pipe, sample_prompts, list(range(len(sample_prompts))), text_encoder=text_encoder)
    tensors = common.changed_tensors("text_encoder", text_encoder, pipe.text_encoder)
    saved = common.save_erased(out, tensors, "sgrace", args, pipe, seconds, samples,
                               extra=dict(**extra, peak_memory_mb=common.profile_peak(profile), profile=profile))
    print(f"wrote {saved} ({len(tensors)} tensors changed; attack {extra['attack_seconds']} s, "
          f"erasure {extra['erase_seconds']} s)")


if __name__ == "__main__":
    main()
