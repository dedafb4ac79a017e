"""RealEra: semantic-level concept erasure via neighbour-concept mining (docs/realera.md).

Paper: "RealEra: Semantic-level Concept Erasure via Neighbor-Concept Mining", Yufan Liu, Jinyang An,
Wanqian Zhang, Ming Li, Dayan Wu, Jingzi Gu, Zheng Lin, Weiping Wang. arXiv:2410.09140 (ICLR 2025
submission, withdrawn). Project page realerasing.github.io/RealEra. No official code is public: this
file is a reconstruction from the abstract, the project page and summaries of the paper, and every
constant we had to infer is a flag (docs/realera.md, "Reconstruction: what is inferred").

Idea. Erasing the words of a concept leaves "concept residue": related phrasings still produce it.
RealEra digs out the concept's semantic neighbourhood by adding random perturbations to the concept's
text embedding e (the text encoder's hidden states, tokens x dim) and keeping the perturbed embeddings
that are close to e, but not too close (a cosine band). These neighbours are erased together with e,
first by a closed-form edit of the U-Net's cross-attention keys and values (as UCE/MACE), then by
training a small LoRA on the same projections so that the U-Net's noise prediction for a neighbour
equals its prediction for a harmless anchor. Perturbations outside the band and real unrelated prompts
("beyond-concept" samples) are held fixed in both stages, so the edit stays local.

Equations (numbered as in docs/realera.md; vec(.) flattens tokens x dim, W0 an original attn2.to_k or
attn2.to_v weight, c a token vector of a concept prompt or of one of its neighbours and c_a the anchor prompt's
token vector paired with it as MACE pairs them: shared words, end-of-text and padding to their counterparts,
the concept's words to the anchor's when both have as many tokens; token_pairs):
  (1) eta = r (v - e) / ||v - e||,  v ~ N(0, I) shaped like e,  r ~ U[0, D1],  D1 = rho ||vec(e)||  perturb
  (2) N = {e + eta : S_low <= cos(vec e, vec(e + eta)) <= S_high}  (neighbours)
      B = {e + eta : cos(vec e, vec(e + eta)) < S_low} + real irrelevant prompts  (beyond)   mine_neighbors
  (3) W* = argmin_W  sum_{c in {e} u N} ||W c - W0 c_a||^2 + alpha sum_{b in B} ||W b - W0 b||^2
                     + lambda ||W - W0||_F^2                 token_pairs, alignment_keys, cross_attention_alignment
         = (lambda W0 + sum W0 c_a c^T + alpha sum W0 b b^T)(lambda I + sum c c^T + alpha sum b b^T)^-1
                                                                      closed_form_edit
  (4) W = W* + U D  (LoRA of rank k on the same projections; U starts at zero)        LoRALinear
  (5) L = ||eps_{W}(x_t, t, e_n) - sg[eps_{W*}(x_t, t, e_a)]||^2
        + beta ||eps_{W}(x_t, t, e_b) - sg[eps_{W*}(x_t, t, e_b)]||^2,
      e_n in {e} u N (fresh neighbours each step), e_b in B, x_t from partial DDIM sampling of the
      concept with the original model                                  noise_alignment_loss
  (6) W <- W* + U D, saved as a plain weight                           merge_lora
"""
import copy
import dataclasses
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import common

# Anchors c_a on SD v1.4: a concept file's "realera" anchor (church: the parent concept "building", a bare word that
# fills "a photo of a {}"), else the kind's (KIND_DEFAULTS), else the concept's anchor (toy: blob / gray).
# Real irrelevant prompts for the beyond-concept set on SD v1.4 (replace with --preserve FILE).
SD_PRESERVE = ["a photo of a dog", "a cat sitting on a sofa", "a bowl of fruit on a table", "a city street at night",
               "a mountain landscape with a lake", "a portrait of a man in a suit", "a woman riding a bicycle",
               "a red car parked by the road", "a plate of pasta", "a sailing boat on the sea",
               "a bird on a branch", "a living room with a fireplace"]
# Per-kind defaults: lambda of Eq. 3, the LoRA's lr and steps, and the anchor c_a, from MACE's official configs
# (github.com/Shilin-LU/MACE, configs/*/*.yaml at 057e7a6: lamb, learning_rate, max_train_steps, mapping_concept);
# RealEra publishes none. A flag beats the table; --model toy's TOY_DEFAULTS replace lr and iterations. An anchor
# of None keeps the concept's own (common.concept_info). docs/realera.md, "Per-kind defaults", says why.
KIND_DEFAULTS = {
    "style": dict(lam=0.0, lr=1e-4, iterations=50, anchor="art",
                  source="MACE configs/art/erase_art_100.yaml"),
    "nudity": dict(lam=0.0, lr=1e-5, iterations=120, anchor="a person wearing clothes",
                   source="MACE configs/explicit_content/erase_explicit_content.yaml"),
    "object": dict(lam=1e3, lr=1e-5, iterations=50, anchor=None,  # MACE: lamb 10 bird, 100 automobile, 1000 ship
                   source="MACE configs/object/erase_ship.yaml (the largest of MACE's three object lambdas)"),
    "colour": dict(lam=1e3, lr=1e-5, iterations=50, anchor=None,  # the miniature world's colours, as its objects
                   source="miniature world: MACE's object row (MACE has no colour config)"),
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
    """erased-model folder (default: outputs/realera-<concept>)"""
    start_from: str | None = None
    """an erased-model folder of the same --model to start from: erase this run's concept(s) from it and
    save the union of its tensors and this run's (a sequential erasure, docs/concepts.md)"""
    words: list[str] = dataclasses.field(default_factory=list)
    """words that name the concept (default: the concept table's words)"""
    anchor: str | None = None
    """anchor word c_a the concept and its neighbours are mapped onto (default: the concept file's 'realera' anchor,
    church -> 'building'; else by kind, MACE's mapping concepts: style -> 'art', nudity -> 'a person wearing
    clothes', an object -> the concept's own anchor; toy: the world's anchor, blob or gray)"""
    templates: list[str] = dataclasses.field(default_factory=list)
    """caption templates ('{}' is the word); each word in each template is a concept prompt e, paired with the
    same template holding the anchor (default: the concept table's templates)"""
    preserve: str | None = None
    """text file of irrelevant prompts, one per line, for the beyond-concept set (default: built-in; toy: the
    other concepts of the same kind except the 'near' ones, in the concept's templates)"""
    span_pairing: str = "same_length"
    """which anchor token the concept's own tokens are paired with in Eq. 3 (shared words, end-of-text and padding
    always pair with their counterparts, as MACE): 'same_length' position by position when the concept and the
    anchor have as many tokens, else not at all, as MACE; 'last' the same, but spans of different lengths still
    pair their last tokens (UCE's last-token rule); 'none' never, exactly MACE's closed form"""
    neighbors: bool = True
    """mine neighbour concepts (Eqs. 1-2); --no_neighbors erases the concept prompts alone (ablation)"""
    beyond: bool = True
    """beyond-concept regularisation: the alpha term of Eq. 3 and the beta term of Eq. 5 (--no_beyond: ablation)"""
    stage: str = "both"
    """which stages run: 'both', 'closed_form' (stage 1 alone, Eq. 3) or 'lora' (stage 2 alone, Eqs. 4-6, on the
    original weights), so a reader can see what each adds"""
    radius_ratio: float = 1.6
    """rho of Eq. 1: the perturbation bound D1 as a multiple of ||vec(e)||, measured per concept prompt (inferred:
    a third-party re-implementation used D1 = 400 on SD v1.4, about 1.6 times its ||vec(e)||)"""
    radius: float | None = None
    """D1 of Eq. 1 as an absolute number instead (e.g. 400, the third party's value for SD v1.4)"""
    s_low: float = 0.5
    """S_low of Eq. 2: a neighbour's cosine to e is at least this; below it a perturbation is 'beyond' (inferred: 0.5)"""
    s_high: float = 0.9
    """S_high of Eq. 2: a neighbour's cosine to e is at most this, else it is the concept itself (inferred: 0.9)"""
    n_neighbors: int = 5
    """neighbours mined per concept prompt for Eq. 3 (inferred: 5)"""
    n_beyond: int = 3
    """beyond perturbations per concept prompt for Eq. 3 (inferred: 3; 0 keeps only the real irrelevant prompts)"""
    max_draws: int = 10000
    """perturbations drawn per concept prompt before giving up on filling the cosine band"""
    alpha: float = 1.0
    """alpha of Eq. 3, the weight of the beyond-concept rows (inferred: 1, UCE's preserve scale)"""
    lam: float | None = None
    """lambda of Eq. 3, the pull towards W0 (default by kind, MACE's configs: 0 for style and nudity, 1e3 for an
    object)"""
    rank: int = 1
    """k of Eq. 4, the LoRA rank (inferred: 1, MACE's explicit-content config; the spec allows 1-4)"""
    lora_init_std: float | None = None
    """standard deviation of the LoRA down-projection's initial weights (default: 1/rank, diffusers' LoRA layer)"""
    beta: float = 1.0
    """beta of Eq. 5, the weight of the beyond-concept term (inferred: 1)"""
    iterations: int | None = None
    """LoRA training steps (default by kind, MACE's configs: 120 for nudity, 50 otherwise)"""
    lr: float | None = None
    """Adam learning rate of the LoRA (default by kind, MACE's configs: 1e-4 for style, 1e-5 otherwise)"""
    batch_size: int = 1
    """neighbour samples per step; as many beyond samples are added (inferred: 1)"""
    n_trajectories: int = 8
    """concept samples drawn once by the original model; x_t is taken from their DDIM trajectories (inferred)"""
    ddim_steps: int = 50
    """DDIM steps of those trajectories"""
    start_guidance: float = 3.0
    """classifier-free guidance of those trajectories (inferred: ESD's 3)"""
    target_model: str = "edited"
    """which U-Net gives the targets of Eq. 5: 'edited' (the stage-1 result without the LoRA, the spec's
    eps_theta) or 'original' (the frozen original model)"""
    samples: list[str] = dataclasses.field(default_factory=list)
    """prompts for samples.png (default: a concept word, a held-out word, a near concept, the anchor)"""
    sample_steps: int | None = None
    """DDIM steps of samples.png (default: the sampler's, 25 toy / 50 SD)"""
    mixed_precision: str = "no"
    """'no', 'fp16' or 'bf16': frozen copies and forward passes in half precision, trained weights and their
    optimizer state in fp32 (as diffusers' training examples do)"""
    seed: int = 0
    """random seed (perturbations, trajectories, LoRA initialisation)"""
    device: str | None = None
    """'cuda' or 'cpu' (default: cuda when available)"""


# --model toy: about 1 minute on one free CPU core (300 steps of 4 + 4 samples on the 16x16 latents).
TOY_DEFAULTS = dict(iterations=300, lr=5e-4, batch_size=4, n_trajectories=16, ddim_steps=common.TOY_SAMPLING["steps"],
                    rank=2)
# What each flag may be: checked by common.parse_args before anything loads (the rules: common.check_args).
LIMITS = dict(sample_steps="[1, 1000]", mixed_precision=("no", "fp16", "bf16"),
              output="erased-model output", words="non-empty", templates="non-empty", preserve="file",
              stage=("both", "closed_form", "lora"), span_pairing=("same_length", "last", "none"),
              radius_ratio="> 0", radius="> 0", s_low="[-1, 1]",
              s_high="[-1, 1]", n_neighbors=">= 0", n_beyond=">= 0", max_draws=">= 1", alpha=">= 0", lam=">= 0",
              rank=">= 1", lora_init_std="> 0", beta=">= 0", iterations=">= 0", lr="> 0", batch_size=">= 1",
              n_trajectories=">= 1", ddim_steps="[1, 1000]", start_guidance=">= 0",
              target_model=("edited", "original"), seed="[0, 4294967295]",
              start_from="erased model")


# ---------------------------------------------------------------------------------------------
# Settings, prompts and frozen embeddings
# ---------------------------------------------------------------------------------------------
def kind_settings(args, info: dict) -> dict:
    """lambda, lr, steps and anchor as this run uses them: a flag if given, else the concept's KIND_DEFAULTS row
    (the anchor: --anchor, else the world's on the miniature model, else the concept file's "realera" anchor,
    else the row's, else the concept's own). Recorded in config.json with the row's source."""
    row = KIND_DEFAULTS.get(info["kind"])
    if row is None:
        common.die(f"RealEra has no defaults for a concept of kind '{info['kind']}'; give its kind, one of: "
                   f"{', '.join(KIND_DEFAULTS)}.")
    if args.anchor is not None:
        anchor = args.anchor
    elif args.model == "toy":
        anchor = info["anchor"]
    else:
        anchor = info["anchors"].get("realera", row["anchor"] if row["anchor"] is not None else info["anchor"])
    return dict(kind=info["kind"], kind_defaults=row["source"], anchor=anchor,
                lam=row["lam"] if args.lam is None else args.lam, lr=row["lr"] if args.lr is None else args.lr,
                iterations=row["iterations"] if args.iterations is None else args.iterations)


ARTICLES = ("a", "an", "the")


def without_article(text: str) -> str:
    """`text` without a leading article: 'a toy' -> 'toy', 'the Louvre' -> 'Louvre', 'art' -> 'art'."""
    first, _, rest = text.strip().partition(" ")
    return rest.strip() if first.lower() in ARTICLES and rest.strip() else text.strip()


def is_phrase(anchor: str) -> bool:
    """A whole-phrase anchor: several words once a leading article is dropped ('a person wearing clothes'),
    which names a whole subject; 'a toy', 'building' and 'art' are one word and stand where a word stands."""
    return len(without_article(anchor).split()) > 1


def fits(template: str, anchor: str) -> bool:
    """Whether the anchor reads well in the template: a one-word anchor fills any slot, as the concept's own
    word does; a whole-phrase anchor only a slot that ends its phrase ('a photo of {}', '{}, oil painting'),
    not one whose next word it would have to modify ('{} person on a beach': 'a person wearing clothes person
    on a beach')."""
    after = template.split("{}", 1)[1].lstrip()
    return not is_phrase(anchor) or after == "" or after[0] in ",.;:!?"


def anchor_prompt(template: str, anchor: str) -> str:
    """The template holding the anchor, spaces normalised ('a photo of ' -> 'a photo of'). When the template
    already puts an article before '{}', the anchor's own article is dropped, as DoCo drops it: 'a photo of a {}'
    with 'a toy' -> 'a photo of a toy', not 'a photo of a a toy'. The template's article is the one kept, so the
    anchor prompt shares its prefix with the concept prompts (which token_pairs pairs position by position)."""
    before = template.split("{}", 1)[0].split()
    if before and before[-1].lower() in ARTICLES:
        anchor = without_article(anchor)
    return " ".join(template.format(anchor).split())


def concept_and_anchor_prompts(words: list[str], anchor: str, templates: list[str]) -> tuple[list[str], list[str]]:
    """Each word in each template the anchor fits (`fits`), paired with the same template holding the anchor
    (`anchor_prompt`). For nudity's 'a person wearing clothes' the template '{} person on a beach' is left out;
    a one-word anchor keeps every template. Stops with one sentence when the anchor fits no template."""
    usable = [t for t in templates if fits(t, anchor)]
    if not usable:
        common.die(f"the anchor '{anchor}' is a whole phrase, which reads well only in a template ending in '{{}}' "
                   f"(such as 'a photo of {{}}'), and no template is one; add one with --templates or pass a "
                   f"one-word --anchor.")
    concept, paired = [], []
    for template in usable:
        for word in words:
            concept.append(template.format(word))
            paired.append(anchor_prompt(template, anchor))
    return concept, paired


def builtin_preserve_prompts(info: dict, model: str, templates: list[str]) -> list[str]:
    """Real irrelevant prompts: the concept file's 'preserve' list, else SD_PRESERVE on SD; on the miniature
    model the other concepts of the same kind, in the concept's templates, except its 'near' concepts (left
    unseen for near-specificity)."""
    if model != "toy":
        return list(info.get("preserve") or SD_PRESERVE)
    return [t.format(c) for c in info["others"] if c not in info["near"] for t in templates]


def sample_anchor_prompt(templates: list[str], anchor: str) -> str:
    """samples.png's anchor prompt: the second template (the concept words' sample template) holding the
    anchor, else the first template it fits, else the bare anchor."""
    template = next((t for t in [templates[1], *templates] if fits(t, anchor)), "{}")
    return anchor_prompt(template, anchor)


@torch.no_grad()
def frozen_embeddings(pipe, groups: dict) -> dict:
    """The text encoder's hidden states [n, L, D] of each prompt group, computed once (the encoder is frozen)."""
    return {name: common.encode(pipe, prompts).float() if prompts else None for name, prompts in groups.items()}


# ---------------------------------------------------------------------------------------------
# Neighbour-concept mining (Eqs. 1-2)
# ---------------------------------------------------------------------------------------------
def perturb(concept_emb: torch.Tensor, radius: float, n: int, generator: torch.Generator) -> torch.Tensor:
    """Eq. 1: n perturbed copies e + r (v - e)/||v - e|| of e [L, D], v ~ N(0, I), r ~ U[0, radius]."""
    v = torch.randn((n, *concept_emb.shape), generator=generator).to(concept_emb)
    direction = v - concept_emb
    direction = direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1)
    r = radius * torch.rand(n, generator=generator).to(concept_emb)
    return concept_emb + r.view(-1, 1, 1) * direction


def cosine_to(concept_emb: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """cos(vec(e), vec(c)) for each candidate [n, L, D] -> [n]."""
    return F.cosine_similarity(candidates.flatten(1), concept_emb.flatten()[None], dim=1)


def mine_neighbors(concept_emb, radius: float, s_low: float, s_high: float, n_neighbors: int, n_beyond: int,
                   generator: torch.Generator, max_draws: int = 10000):
    """Eq. 2: draw perturbations (Eq. 1) until n_neighbors lie in the cosine band [s_low, s_high] and
    n_beyond below s_low; draws above s_high (the concept itself) are discarded.
    Returns neighbours [n_neighbors, L, D], beyond perturbations [n_beyond, L, D] and the draws used."""
    empty = concept_emb.new_zeros((0, *concept_emb.shape))  # so that asking for none (--no_neighbors --no_beyond) works
    neighbors, beyond, draws = [empty], [empty], 0
    chunk = 4 * (n_neighbors + n_beyond) + 4
    while sum(map(len, neighbors)) < n_neighbors or sum(map(len, beyond)) < n_beyond:
        if draws >= max_draws:
            common.die(f"{draws} perturbations gave too few neighbours in the cosine band [{s_low}, {s_high}] "
                       f"(radius {radius:.1f}); change --radius_ratio / --radius or widen --s_low / --s_high.")
        candidates = perturb(concept_emb, radius, chunk, generator)
        cos = cosine_to(concept_emb, candidates)
        neighbors.append(candidates[(cos >= s_low) & (cos <= s_high)])
        beyond.append(candidates[cos < s_low])
        draws += chunk
    return torch.cat(neighbors)[:n_neighbors], torch.cat(beyond)[:n_beyond], draws


def perturbation_radius(concept_emb: torch.Tensor, args) -> float:
    """D1 of Eq. 1: --radius, or --radius_ratio times ||vec(e)|| of this concept prompt."""
    return args.radius if args.radius is not None else args.radius_ratio * float(concept_emb.norm())


# ---------------------------------------------------------------------------------------------
# Stage 1: closed-form cross-attention alignment (Eq. 3)
# ---------------------------------------------------------------------------------------------
def token_pairs(concept_ids: list[int], anchor_ids: list[int], length: int, span_pairing: str = "same_length"):
    """Which anchor token each concept token is mapped onto in Eq. 3, as MACE pairs them (official
    src/cfr_utils.py, find_matching_indices and prepare_k_v). Both id lists run from the start token to the
    first end-of-text token, without padding. Pairs, in order:
      - the shared prefix (start token, template words before the concept), position to same position;
      - the shared suffix (template words after the concept, end-of-text), counted from the end;
      - the padding after end-of-text, by distance from it, until the prompt with more tokens reaches `length`:
        the shorter prompt's last positions stay unpaired (as MACE's; "a photo of nudity", 7 tokens, against "a
        photo of a person wearing clothes", 9: concept positions 7-74 pair with anchor 9-76, and 75-76 stay out);
      - the differing middle, the concept's span and the anchor's span: span_pairing 'same_length' pairs them
        position by position when they have as many tokens and leaves them out otherwise, as MACE always does
        ('none'); 'last' also pairs the two last tokens of spans of different lengths (UCE's last-token rule).
    Returns (concept positions, anchor positions), two lists of equal length, sorted by concept position."""
    n_c, n_a = len(concept_ids), len(anchor_ids)
    prefix = 0
    while prefix < min(n_c, n_a) and concept_ids[prefix] == anchor_ids[prefix]:
        prefix += 1
    suffix = 0  # never overlapping the prefix in either prompt
    while suffix < min(n_c, n_a) - prefix and concept_ids[n_c - 1 - suffix] == anchor_ids[n_a - 1 - suffix]:
        suffix += 1
    span_c, span_a = range(prefix, n_c - suffix), range(prefix, n_a - suffix)
    if span_pairing != "none" and len(span_c) == len(span_a):
        span = list(zip(span_c, span_a))
    elif span_pairing == "last" and len(span_c) and len(span_a):
        span = [(span_c[-1], span_a[-1])]
    else:
        span = []
    shared_end = [(n_c - suffix + j, n_a - suffix + j) for j in range(suffix)]
    padding = [(n_c + k, n_a + k) for k in range(length - max(n_c, n_a))]
    pairs = [(i, i) for i in range(prefix)] + span + shared_end + padding
    return [c for c, _ in pairs], [a for _, a in pairs]


def prompt_token_pairs(pipe, concept_prompts: list[str], anchor_prompts: list[str], span_pairing: str) -> list:
    """token_pairs for each concept prompt and its anchor prompt, from the pipeline's tokenizer (padded length L)."""
    concept_ids, anchor_ids = common.tokenize(pipe, concept_prompts), common.tokenize(pipe, anchor_prompts)
    concept_eos, anchor_eos = common.eos_index(pipe, concept_ids).tolist(), common.eos_index(pipe, anchor_ids).tolist()
    return [token_pairs(c[:i + 1].tolist(), a[:j + 1].tolist(), c.shape[0], span_pairing)
            for c, i, a, j in zip(concept_ids, concept_eos, anchor_ids, anchor_eos)]


def alignment_keys(concept_emb, anchor_emb, pairs: list, neighbors: list, beyond: list, preserve_emb=None):
    """The rows of Eq. 3. Erase keys: the paired token columns (`pairs`, from token_pairs) of each concept prompt
    e_i [L, D] and of its neighbours, which share e_i's token layout (a perturbed neighbour has no token
    correspondence of its own); their anchor keys: the paired columns of the anchor prompt. Preserved keys:
    every column of the beyond perturbations and of the irrelevant prompts.
    Returns erase [n, D], anchor [n, D], preserve [m, D]."""
    erase, anchor = [], []
    for e, a, (concept_pos, anchor_pos), mined in zip(concept_emb, anchor_emb, pairs, neighbors):
        group = torch.cat([e[None], mined])  # {e} u N: [1 + k, L, D]
        erase.append(group[:, concept_pos].flatten(0, 1))  # [(1 + k) P, D], e's P rows first
        anchor.append(a[anchor_pos].repeat(len(group), 1))
    kept = [b.flatten(0, 1) for b in beyond] + ([preserve_emb.flatten(0, 1)] if preserve_emb is not None else [])
    preserve = torch.cat(kept) if kept else concept_emb.new_zeros(0, concept_emb.shape[-1])
    return torch.cat(erase), torch.cat(anchor), preserve


def closed_form_edit(W: torch.Tensor, erase_keys: torch.Tensor, target_values: torch.Tensor,
                     preserve_keys: torch.Tensor, alpha: float, lam: float) -> torch.Tensor:
    """Eq. 3 for one projection W0 = `W` [d_out, d_in] (no bias): erase keys c as rows [n, d_in], their target
    values W0 c_a as rows [n, d_out], preserved keys b as rows [m, d_in] (m may be 0). Returns W* [d_out,
    d_in] in W's dtype. UCE's solve (uce.py carries the same function, with an erase scale): the sums are
    accumulated as matrix products in float32 and W* = solve(G, R^T)^T with G = lambda I + sum c c^T +
    alpha sum b b^T symmetric, not an inverse (MACE's closed_form_refinement multiplies by torch.inverse(G)).
    Raises torch.linalg.LinAlgError if G is singular (possible only with lam = 0)."""
    W0, keys, values = W.detach().float(), erase_keys.float(), target_values.float()
    kept = preserve_keys.float().reshape(-1, W0.shape[1])
    rhs = lam * W0 + values.T @ keys + alpha * (W0 @ kept.T) @ kept  # R [d_out, d_in]
    gram = lam * torch.eye(W0.shape[1], device=W0.device) + keys.T @ keys + alpha * kept.T @ kept  # G [d_in, d_in]
    return torch.linalg.solve(gram, rhs.T).T.to(W.dtype)


@torch.no_grad()
def cross_attention_alignment(unet, erase_keys, anchor_keys, preserve_keys, alpha: float, lam: float) -> int:
    """Eq. 3 for every attn2.to_k / attn2.to_v of `unet`, in place, each with its own W0: target values W0 c_a,
    solved by closed_form_edit. Returns the number of edited weights."""
    projections = common.attn2_projections(unet)
    for name, layer in projections:
        W0 = layer.weight
        target_values = anchor_keys.float() @ W0.float().T  # W0 c_a as rows [n, d_out]
        try:
            W_new = closed_form_edit(W0, erase_keys, target_values, preserve_keys, alpha, lam)
        except torch.linalg.LinAlgError:
            common.die(f"the closed form of {name} is singular; nothing was written. Pass a positive --lam.")
        if not torch.isfinite(W_new).all():
            common.die(f"the closed form of {name} is not finite; nothing was written. Raise --lam.")
        layer.weight.copy_(W_new)
    return len(projections)


# ---------------------------------------------------------------------------------------------
# Stage 2: LoRA prediction-noise alignment (Eqs. 4-6)
# ---------------------------------------------------------------------------------------------
class LoRALinear(torch.nn.Module):
    """Eq. 4: y = W x + U (D x), D [rank, d_in] random, U [d_out, rank] zero, so training starts at W."""

    def __init__(self, base: torch.nn.Linear, rank: int, init_std: float):
        super().__init__()
        self.base, self.enabled = base, True
        self.down = torch.nn.Linear(base.in_features, rank, bias=False).to(base.weight)
        self.up = torch.nn.Linear(rank, base.out_features, bias=False).to(base.weight)
        torch.nn.init.normal_(self.down.weight, std=init_std)
        torch.nn.init.zeros_(self.up.weight)

    def forward(self, x):
        out = self.base(x)
        return out + self.up(self.down(x)) if self.enabled else out

    @torch.no_grad()
    def merged(self) -> torch.nn.Linear:
        """Eq. 6: the base layer with W + U D written into its weight."""
        self.base.weight += (self.up.weight.float() @ self.down.weight.float()).to(self.base.weight.dtype)
        return self.base


def add_lora(unet, rank: int, init_std: float) -> list[LoRALinear]:
    """Wrap every attn2.to_k / attn2.to_v of `unet` in a LoRALinear; freeze all else, train only U and D."""
    unet.requires_grad_(False)
    loras = []
    for name, layer in common.attn2_projections(unet):
        parent, child = name.rsplit(".", 1)
        lora = LoRALinear(layer, rank, init_std)
        lora.down.requires_grad_(True)
        lora.up.requires_grad_(True)
        setattr(unet.get_submodule(parent), child, lora)
        loras.append(lora)
    return loras


def merge_lora(unet):
    """Eq. 6 for every LoRALinear in `unet`: the plain nn.Linear comes back under its old name, so the
    saved tensors are the same 'changed tensors only' as every other method's."""
    for name, module in list(unet.named_modules()):
        if isinstance(module, LoRALinear):
            parent, child = name.rsplit(".", 1)
            setattr(unet.get_submodule(parent), child, module.merged())
    return unet


def set_lora_enabled(loras: list[LoRALinear], enabled: bool):
    for lora in loras:
        lora.enabled = enabled


@torch.no_grad()
def concept_trajectories(pipe, cond, uncond, seeds: list[int], steps: int, guidance: float, batch: int = 8):
    """DDIM trajectories of the concept drawn by the original model: x_t before every step [n, K, C, h, w]
    and the DDPM timestep of each step [K] (x_t at index k is common.sample_until's x_t for stop = k)."""
    timesteps = common.ddim_timesteps(pipe, steps)
    trajectories = []
    for i in range(0, len(seeds), batch):
        latents, n, states = common.initial_latents(pipe, seeds[i:i + batch]), len(seeds[i:i + batch]), []
        for t in timesteps:
            states.append(latents)
            eps = common.predict_noise(pipe.unet, latents, t, cond[i:i + n], uncond.expand(n, -1, -1), guidance)
            latents = pipe.scheduler.step(eps, t, latents).prev_sample
        trajectories.append(torch.stack(states, 1))
    return torch.cat(trajectories), timesteps


def noise_alignment_loss(eps_neighbor, eps_anchor, eps_beyond=None, eps_beyond_target=None, beta: float = 1.0):
    """Eq. 5: MSE of the neighbours' prediction to the anchor's, plus beta times the MSE of the beyond
    samples' prediction to their own unedited prediction (targets are detached by the caller)."""
    loss = F.mse_loss(eps_neighbor.float(), eps_anchor.float())
    if eps_beyond is not None:
        loss = loss + beta * F.mse_loss(eps_beyond.float(), eps_beyond_target.float())
    return loss


# ---------------------------------------------------------------------------------------------
# main: frozen embeddings, stage 1 (closed form), stage 2 (LoRA), merge, save
# ---------------------------------------------------------------------------------------------
def main(argv=None):
    args = common.parse_args(Args, argv, toy_defaults=TOY_DEFAULTS, limits=LIMITS)
    if not args.s_low < args.s_high:
        common.die(f"need -1 <= --s_low < --s_high <= 1, not {args.s_low} and {args.s_high}.")
    infos = common.concept_set(args)  # one concept, or several erased together
    common.several_concepts(infos, args)
    info, settings_of = infos[0], [kind_settings(args, i) for i in infos]
    settings = settings_of[0]
    for key, flag in (("lam", "--lam"), ("lr", "--lr"), ("iterations", "--iterations")):  # one solve, one LoRA
        if len({s[key] for s in settings_of}) > 1:
            values = ", ".join(f"{i['name']}: {s[key]}" for i, s in zip(infos, settings_of))
            common.die(f"these concepts' kinds give different {key} ({values}); pick one for all of them with {flag}.")
    lam, lr, iterations, anchor = settings["lam"], settings["lr"], settings["iterations"], settings["anchor"]
    if args.stage == "lora" and iterations == 0:
        common.die("--stage lora with --iterations 0 changes nothing; give --iterations 1 or more, or --stage both.")
    words = args.words or info["words"]
    templates = args.templates or info["templates"]
    if not all("{}" in t for t in templates):
        common.die("every --templates entry needs a '{}' where the word goes.")
    # Several concepts: every concept's prompts, each paired with its own anchor, go into the one stacked solve of
    # Eq. 3 (MACE's closed-form refinement over all concepts) and train one LoRA (docs/realera.md, "Several concepts").
    concept_prompts, anchor_prompts, preserve_prompts = [], [], []
    for i, s in zip(infos, settings_of):
        prompts, paired = concept_and_anchor_prompts(args.words or i["words"], s["anchor"], args.templates or i["templates"])
        concept_prompts, anchor_prompts = concept_prompts + prompts, anchor_prompts + paired
        preserve_prompts += builtin_preserve_prompts(i, args.model, args.templates or i["templates"])
    if len(infos) > 1:
        preserve_prompts = list(dict.fromkeys(preserve_prompts))  # the concepts may share irrelevant prompts
    if args.preserve:
        try:
            preserve_prompts = [line.strip() for line in Path(args.preserve).read_text().splitlines() if line.strip()]
        except OSError:
            common.die(f"cannot read --preserve {args.preserve}.")
    preserve_prompts = preserve_prompts if args.beyond else []
    n_neighbors, n_beyond = (args.n_neighbors if args.neighbors else 0), (args.n_beyond if args.beyond else 0)
    if args.beyond and not preserve_prompts and n_beyond == 0:
        common.die("the beyond-concept set is empty: give --n_beyond > 0 or --preserve FILE, or pass --no_beyond.")
    out = common.erased_output("realera", infos, args)
    common.seed_everything(args.seed)
    rng, generator = random.Random(args.seed), torch.Generator().manual_seed(args.seed)
    pipe = common.load_pipeline(args.model, device=args.device, start_from=args.start_from)
    pipe.sample_steps = args.sample_steps
    start, profile = time.time(), {}

    with common.phase(profile, "caching", pipe.device):
        emb = frozen_embeddings(pipe, dict(concept=concept_prompts, anchor=anchor_prompts, preserve=preserve_prompts,
                                           uncond=[""]))  # [n, L, D] each, never re-encoded
        radii = [perturbation_radius(e, args) for e in emb["concept"]]
    unet = copy.deepcopy(pipe.unet)
    scaler = common.set_mixed_precision(pipe, args.mixed_precision)  # after the copy: the edited U-Net stays fp32
    stats = dict(concept_prompts=concept_prompts, anchor_prompts=anchor_prompts, preserve_prompts=len(preserve_prompts),
                 **settings,
                 concept_norm=round(float(emb["concept"].flatten(1).norm(dim=1).mean()), 2),
                 radius=round(sum(radii) / len(radii), 2), peak_memory_mb=None)

    if args.stage in ("both", "closed_form"):  # Stage 1, Eq. 3
        with common.phase(profile, "closed_form", pipe.device):
            mined = [mine_neighbors(e, r, args.s_low, args.s_high, n_neighbors, n_beyond, generator, args.max_draws)
                     for e, r in zip(emb["concept"], radii)]
            neighbors, beyond = [m[0] for m in mined], [m[1] for m in mined]
            pairs = prompt_token_pairs(pipe, concept_prompts, anchor_prompts, args.span_pairing)
            erase_keys, anchor_keys, preserve_keys = alignment_keys(emb["concept"], emb["anchor"], pairs, neighbors,
                                                                    beyond, emb["preserve"])
            n_edited = cross_attention_alignment(unet, erase_keys, anchor_keys, preserve_keys, args.alpha, lam)
            draws = sum(m[2] for m in mined)
            print(f"closed form: {len(concept_prompts)} concept prompts (||vec(e)|| {stats['concept_norm']}, D1 "
                  f"{stats['radius']}), {sum(map(len, neighbors))} neighbours and {sum(map(len, beyond))} beyond "
                  f"perturbations from {draws} draws, {len(preserve_prompts)} irrelevant prompts; {len(erase_keys)} "
                  f"erased and {len(preserve_keys)} preserved token vectors in {n_edited} projections")
            stats.update(closed_form_draws=draws, erased_token_vectors=len(erase_keys),
                         preserved_token_vectors=len(preserve_keys), paired_tokens=[len(c) for c, _ in pairs])

    if args.stage in ("both", "lora") and iterations > 0:  # Stage 2, Eqs. 4-6
        with common.phase(profile, "trajectories", pipe.device), common.autocast(pipe):
            traj_prompts = [rng.randrange(len(concept_prompts)) for _ in range(args.n_trajectories)]
            traj_seeds = [rng.randrange(2**31) for _ in range(args.n_trajectories)]
            trajectories, timesteps = concept_trajectories(pipe, emb["concept"][traj_prompts], emb["uncond"], traj_seeds,
                                                           args.ddim_steps, args.start_guidance)  # [n, K, C, h, w]
        loras = add_lora(unet, args.rank, args.lora_init_std or 1.0 / args.rank)
        params = [p for lora in loras for p in (lora.down.weight, lora.up.weight)]
        optimizer = torch.optim.Adam(params, lr=lr)
        target_unet = pipe.unet if args.target_model == "original" else unet
        n = args.batch_size

        def neighbor_of(i):  # e_n in {e} u N: e itself with probability 1 / (1 + n_neighbors), else a fresh neighbour
            if rng.random() < 1 / (1 + n_neighbors):
                return emb["concept"][i]
            return mine_neighbors(emb["concept"][i], radii[i], args.s_low, args.s_high, 1, 0, generator, args.max_draws)[0][0]

        def beyond_of(i):  # e_b in B: an irrelevant prompt or a fresh beyond perturbation, half and half
            if preserve_prompts and (n_beyond == 0 or rng.random() < 0.5):
                return emb["preserve"][rng.randrange(len(preserve_prompts))]
            return mine_neighbors(emb["concept"][i], radii[i], args.s_low, args.s_high, 0, 1, generator, args.max_draws)[1][0]

        with common.phase(profile, "training", pipe.device), common.autocast(pipe):
            bar = tqdm(range(iterations), desc="RealEra LoRA")
            for step in common.timed(bar, profile, pipe.device):
                which = [rng.randrange(args.n_trajectories) for _ in range(n)]
                k = torch.tensor([rng.randrange(len(timesteps)) for _ in range(n)])
                x_t, t = trajectories[which, k], timesteps[k].to(pipe.device)
                prompt_ids = [traj_prompts[i] for i in which]
                ctx = torch.stack([neighbor_of(i) for i in prompt_ids])  # [n, L, D]
                target_ctx = emb["anchor"][prompt_ids]
                if args.beyond:
                    beyond_ctx = torch.stack([beyond_of(i) for i in prompt_ids])
                    ctx, target_ctx = torch.cat([ctx, beyond_ctx]), torch.cat([target_ctx, beyond_ctx])
                    x_t, t = torch.cat([x_t, x_t]), torch.cat([t, t])
                with torch.no_grad():
                    set_lora_enabled(loras, False)  # sg[eps_theta]: the stage-1 weights without the LoRA
                    eps_target = target_unet(x_t, t, encoder_hidden_states=target_ctx).sample
                    set_lora_enabled(loras, True)
                eps = unet(x_t, t, encoder_hidden_states=ctx).sample
                loss = noise_alignment_loss(eps[:n], eps_target[:n], eps[n:] if args.beyond else None,
                                            eps_target[n:] if args.beyond else None, args.beta)
                if not torch.isfinite(loss):
                    common.die(f"the loss became NaN at step {step}; nothing was written. Lower --lr.")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                bar.set_postfix(loss=f"{loss.item():.4f}", t=int(t[0]))
        common.release(optimizer)
        merge_lora(unet)

    unet.eval().requires_grad_(False)
    seconds = time.time() - start
    sample_prompts = args.samples or [info["templates"][1].format(w) for w in
                                      [words[0], *info["held_out"][:1], *info["near"][:1]]] + (
        [sample_anchor_prompt(info["templates"], anchor)] if anchor.strip() else [])
    if len(infos) > 1:
        stats.update(concepts_settings={i["name"]: s for i, s in zip(infos, settings_of)})  # each concept's anchor and row
        sample_prompts = args.samples or [i["templates"][1].format(i["words"][0]) for i in infos]
    with common.phase(profile, "samples", pipe.device):
        samples = common.before_after(pipe, sample_prompts, list(range(len(sample_prompts))), unet=unet)
    stats.update(peak_memory_mb=common.profile_peak(profile), profile=profile)
    tensors = common.changed_tensors("unet", unet, pipe.unet)
    saved = common.save_erased(out, tensors, "realera", args, pipe, seconds, samples, extra=stats)
    print(f"wrote {saved} ({len(tensors)} tensors changed)")


if __name__ == "__main__":
    main()
