"""SAGE: semantic-augment erasing with global-local collaborative retention (docs/sage.md).

Paper: "SAGE: Exploring the Boundaries of Unsafe Concept Domain with Semantic-Augment Erasing",
Hongguang Zhu, Yunchao Wei, Mengyu Wang, Siyu Jiao, Yan Fang, Jiannan Huang, Yao Zhao.
arXiv:2506.09363 (2025). The announced repository (github.com/KevinLight831/SAGE) holds only a README:
there is no official code, and the paper body was not available. This file is a RECONSTRUCTION from the
abstract and third-party summaries; every inferred constant is a flag (docs/sage.md lists them).

Idea. Erasing a *word* leaves the "word concept abyss": other prompts that name the concept differently
still generate it. SAGE erases the concept *domain* instead, with a cycle of self-check and
self-erasure on the text encoder (the U-Net stays frozen). Self-check searches text space
"inside-out": it starts inside the domain (at the concept's token embeddings) and moves away from them
while the *training* encoder still maps the point onto the *original* encoder's concept feature; a
point that passes the check is a boundary sample and joins a cyclic buffer. Self-erasure trains the text
encoder with ESD's negative-guidance target on the concept and its boundary samples. Global-local
collaborative retention keeps everything else: globally the cosine-similarity structure of many
irrelevant vocabulary words, locally the U-Net's predicted noise for a few of them.

Equations (numbered as in docs/sage.md; E_0 frozen, E_theta trained text encoder, U frozen U-Net,
e = emb(c) the concept's token embeddings, pool the EOT-token feature, sim the cosine):
  (1) P* = argmax_{||P_i - e_i|| <= delta ||e_i||}  sim(pool(E_theta(P)), pool(E_0(c))) - beta sim(P, e),
      K steps of normalised-gradient ascent from the newest accepted sample (or e) plus noise  boundary_search
  (2) accept P* iff sim(pool(E_theta(P*)), pool(E_0(c))) > tau_s; buffer B <- B + {P*}, cyclic  self_check
  (3) k ~ U{0..T-1}; z_t = T-step DDIM of c with the frozen model, guidance 3, stopped after k  common.sample_until
  (4) eps_target = e_0 - eta (e_p - e_0),  e_0 = U(z_t, t, E_0("")),  e_p = U(z_t, t, E_0(c))  negative_guidance_target
  (5) L_erase = mean_{x in {c} + B} || U(z_t, t, E_theta(x)) - eps_target ||^2                self_erasure_loss
  (6) L_glob  = mean_ij (S(E_theta(R_g)) - S(E_0(R_g)))_ij^2,  S = cosine matrix of pooled features
                                                                                          global_retention_loss
  (7) L_loc   = mean_{r in R_l} || U(z_t, t, E_theta(r)) - U(z_t, t, E_0(r)) ||^2             local_retention_loss
  (8) L = L_erase + lambda_g L_glob + lambda_l L_loc;  Adam on the text encoder's transformer weights
"""
import collections
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
    the concept file's kind); it picks the concept's default anchor and templates (common.KIND_ANCHORS, KIND_TEMPLATES); SAGE has no other per-kind setting"""
    concept_file: str | None = None
    """a concept file (JSON: words, held-out words, near concepts, anchor, templates; docs/concepts.md) describing
    the concept; --concept may then be left out"""
    model: str = common.SD14
    """'toy' (the miniature model), a hub id such as CompVis/stable-diffusion-v1-4, or a local path"""
    output: str | None = None
    """erased-model folder (default: outputs/sage-<concept>)"""
    start_from: str | None = None
    """an erased-model folder of the same --model to start from: erase this run's concept(s) from it and
    save the union of its tensors and this run's (a sequential erasure, docs/concepts.md)"""
    words: list[str] = dataclasses.field(default_factory=list)
    """prompts that name the concept, one drawn per iteration (default: the concept table's words)"""
    iterations: int = 1000
    """training steps (AdvUnlearn: 1000)"""
    lr: float = 1e-5
    """Adam learning rate of the text encoder's transformer weights (AdvUnlearn: 1e-5)"""
    batch_size: int = 1
    """partial samples z_t per step (AdvUnlearn: 1)"""
    ddim_steps: int = 50
    """T of Eq. 3, the DDIM steps of the sampler that makes z_t (AdvUnlearn: 50)"""
    start_guidance: float = 3.0
    """guidance used to sample z_t (Eq. 3; AdvUnlearn: 3)"""
    negative_guidance: float = 1.0
    """eta of Eq. 4 (AdvUnlearn: 1)"""
    self_check: bool = True
    """search and erase boundary samples (Eqs. 1-2); --no_self_check erases the words only (ablation)"""
    warm_up: int = 200
    """iterations that erase the words only before the first self-check (AdvUnlearn's attack warm-up: 200)"""
    check_every: int = 1
    """run the boundary search every this many iterations after the warm-up (inferred)"""
    search_steps: int = 10
    """K of Eq. 1, ascent steps of one boundary search, text encoder only (inferred)"""
    step_size: float = 0.2
    """length of one ascent step, as a fraction of the ball radius delta ||e_i|| (inferred)"""
    beta: float = 1.0
    """beta of Eq. 1, weight of the push away from the concept's token embeddings (inferred)"""
    delta: float = 1.0
    """delta of Eq. 1, radius of the search ball around each concept token, relative to that token
    embedding's norm (inferred)"""
    init_noise: float = 0.25
    """random start of a search, as a fraction of the radius (inferred; at e itself both terms of Eq. 1
    have zero gradient while E_theta = E_0)"""
    tau: float = 0.9
    """tau_s of Eq. 2, the self-check's cosine threshold (inferred)"""
    buffer_size: int = 16
    """capacity of the cyclic buffer of accepted boundary samples (inferred)"""
    boundary_per_step: int = 2
    """buffered boundary samples of the current word erased with it each step (Eq. 5; inferred)"""
    global_retention: bool = True
    """global semantic relationship alignment (Eq. 6); --no_global_retention switches it off (ablation)"""
    lambda_g: float = 1.0
    """lambda_g of Eq. 8 (inferred)"""
    global_candidates: int = 2000
    """vocabulary words drawn at random as candidates for the irrelevant concepts R_g (inferred)"""
    global_exclude: float = 0.1
    """fraction of the candidates nearest to the concept (pooled cosine, original encoder) left out of
    R_g, so that synonyms are not retained (inferred)"""
    global_batch: int = 128
    """irrelevant concepts per step in the similarity matrix of Eq. 6 (inferred)"""
    with_concept_similarity: bool = False
    """also align each irrelevant concept's similarity to the original concept feature (Eq. 6's option)"""
    local_retention: bool = True
    """local predicted-noise preservation (Eq. 7); --no_local_retention switches it off (ablation)"""
    lambda_l: float = 0.3
    """lambda_l of Eq. 8 (AdvUnlearn's retain weight: 0.3)"""
    local_batch: int = 5
    """irrelevant prompts per step in Eq. 7 (AdvUnlearn's retain batch: 5)"""
    local_pool: int = 100
    """irrelevant words (drawn from R_g) whose original contexts are cached for Eq. 7 (inferred)"""
    keep_uncond: bool = True
    """also preserve the prediction for the empty prompt, which the erased encoder also encodes at sampling
    time (inferred)"""
    unet_batch: int = 4
    """U-Net rows (prompts x latents) per forward/backward chunk of Eqs. 5 and 7; the gradient is accumulated
    over chunks, so this changes memory, not the result (4 fits SD v1.4 on a 24 GB GPU)"""
    pooling: str = "eot"
    """pooled text feature: 'eot' (end-of-text token's final hidden state, projected where the encoder has a
    projection) or 'mean' (mean over the tokens up to it) (inferred)"""
    samples: list[str] = dataclasses.field(default_factory=list)
    """prompts for samples.png (default: a concept word, a held-out word, a near concept)"""
    sample_steps: int | None = None
    """DDIM steps of samples.png (default: the sampler's, 25 toy / 50 SD)"""
    mixed_precision: str = "no"
    """'no', 'fp16' or 'bf16': frozen copies and forward passes in half precision, trained weights and their
    optimizer state in fp32 (as diffusers' training examples do)"""
    seed: int = 0
    """random seed"""
    device: str | None = None
    """'cuda' or 'cpu' (default: cuda when available)"""


# --model toy: lr and iterations chosen by docs/budgets.md's rule on the development concepts (triangle, blue).
TOY_DEFAULTS = dict(iterations=300, lr=3e-4, ddim_steps=common.TOY_SAMPLING["steps"], warm_up=40,
                    global_batch=64, local_batch=3, local_pool=64, unet_batch=64)
# What each flag may be: checked by common.parse_args before anything loads (the rules: common.check_args).
LIMITS = dict(sample_steps="[1, 1000]", mixed_precision=("no", "fp16", "bf16"), unet_batch=">= 1",
              output="erased-model output", words="non-empty", iterations=">= 1", lr="> 0", batch_size=">= 1",
              ddim_steps="[1, 1000]", start_guidance=">= 0", negative_guidance=">= 0", warm_up=">= 0",
              check_every=">= 1", search_steps=">= 0", step_size=">= 0", beta=">= 0", delta="> 0", init_noise=">= 0",
              tau="[-1, 1]", buffer_size=">= 1", boundary_per_step=">= 0", lambda_g=">= 0", global_candidates=">= 2",
              global_exclude="[0, 1)", global_batch=">= 2", lambda_l=">= 0", local_batch=">= 0", local_pool=">= 0",
              pooling=("eot", "mean"), seed="[0, 4294967295]", start_from="erased model")


# ---------------------------------------------------------------------------------------------
# Text space: token embeddings, the trained parameters (pool(.) is common.pool; of prompts, common.pooled_features)
# ---------------------------------------------------------------------------------------------
def token_embeddings(text_encoder, ids: torch.Tensor) -> torch.Tensor:
    """emb(x): the (frozen) token embeddings [B, L, D] of token ids [B, L]."""
    return text_encoder.get_input_embeddings()(ids)


def transformer_weights(name: str) -> bool:
    """The trained parameters: the transformer layers and the final layer norm; the token and position
    embeddings stay frozen (so a soft prompt means the same before and after training)."""
    return "embeddings." not in name


# ---------------------------------------------------------------------------------------------
# Self-check: the inside-out boundary search and its acceptance test (Eqs. 1-2)
# ---------------------------------------------------------------------------------------------
def project_to_ball(soft_prompt, concept_embeds, radius):
    """Clip each token's offset from the concept's token embedding to its radius [1, L, 1]."""
    offset = soft_prompt - concept_embeds
    scale = (radius / offset.norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
    return concept_embeds + offset * scale


def boundary_search(text_encoder, start, concept_embeds, content, eos, concept_feature, beta: float, delta: float,
                    steps: int, step_size: float, init_noise: float, pooling: str, generator=None):
    """Eq. (1): from `start` [1, L, D] plus noise, `steps` normalised-gradient ascent steps on
    sim(pool(E_theta(P)), pool(E_0(c))) - beta sim(P, e) inside the ball ||P_i - e_i|| <= delta ||e_i||.
    Only the concept's own tokens (`content`, bool [L]) move; start/end/padding tokens stay."""
    mask = content[None, :, None].to(start.dtype)  # [1, L, 1]
    radius = delta * concept_embeds.norm(dim=-1, keepdim=True)  # [1, L, 1]
    noise = torch.randn(start.shape, generator=generator).to(start.device, start.dtype)
    noise = noise / noise.norm(dim=-1, keepdim=True) * radius * init_noise
    soft_prompt = project_to_ball(start + mask * noise, concept_embeds, radius)
    for _ in range(steps):
        soft_prompt = soft_prompt.detach().requires_grad_(True)
        feature = common.pool(common.text_forward(text_encoder, soft_prompt), eos, pooling, text_encoder)
        in_domain = F.cosine_similarity(feature, concept_feature, dim=-1).sum()
        away = F.cosine_similarity((soft_prompt * mask).flatten(), (concept_embeds * mask).flatten(), dim=0)
        (grad,) = torch.autograd.grad(in_domain - beta * away, soft_prompt)
        grad = mask * grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        soft_prompt = project_to_ball(soft_prompt.detach() + step_size * radius * grad, concept_embeds, radius)
    return soft_prompt.detach()


@torch.no_grad()
def self_check(text_encoder, soft_prompt, eos, concept_feature, tau: float, pooling: str):
    """Eq. (2): is the sample still mapped into the concept domain of the original encoder by the training
    encoder? Returns (accepted, similarity)."""
    feature = common.pool(common.text_forward(text_encoder, soft_prompt), eos, pooling, text_encoder)
    similarity = float(F.cosine_similarity(feature, concept_feature, dim=-1).min())
    return similarity > tau, similarity


# ---------------------------------------------------------------------------------------------
# Self-erasure (Eqs. 4-5)
# ---------------------------------------------------------------------------------------------
def negative_guidance_target(eps_uncond, eps_concept, negative_guidance: float):
    """Eq. (4), ESD's target: the frozen prediction guided *away* from the concept."""
    return eps_uncond - negative_guidance * (eps_concept - eps_uncond)


def self_erasure_loss(eps_trained, eps_target):
    """Eq. (5): mean squared error over every element (each prompt x in {c} + B is a batch row)."""
    return F.mse_loss(eps_trained.float(), eps_target.float())


# ---------------------------------------------------------------------------------------------
# Global-local collaborative retention (Eqs. 6-7)
# ---------------------------------------------------------------------------------------------
def vocabulary_words(tokenizer) -> list[str]:
    """The candidate words of R_g: every vocabulary entry that ends a word, in id order, as plain text
    ('church', not 'church</w>'), once each, if it is ASCII letters only; special tokens left out. With CLIP's
    BPE an entry ends a word when it carries the '</w>' suffix; with a word-level tokenizer (the miniature
    model) every entry is a word. A word-final entry is not always a word of its own: 'dity</w>' is the end of
    'nudity' (nu + dity), 'asts</w>' of longer words. irrelevant_concepts removes the pieces of the concept's own
    words; the other endings stay, as no offline test tells them from words (each encodes alone to its one token,
    as a word does)."""
    vocab = tokenizer.get_vocab()
    tokens = [t for t in sorted(vocab, key=vocab.get) if t not in set(tokenizer.all_special_tokens)]
    bpe = any(t.endswith("</w>") for t in tokens)
    words = [t[:-4] if bpe else t for t in tokens if t.endswith("</w>") or not bpe]
    return list(dict.fromkeys(w for w in words if w.isascii() and w.isalpha()))


def word_pieces(tokenizer, phrases: list[str]) -> set[str]:
    """Every token the tokenizer cuts `phrases` into, as plain lower-case text: 'nudity' -> {'nu', 'dity'},
    'without clothes' -> {'without', 'clothes'}."""
    return {piece.removesuffix("</w>").lower() for phrase in phrases for piece in tokenizer.tokenize(phrase)}


@torch.no_grad()
def irrelevant_concepts(pipe, concept_words: list[str], held_out: list[str], n_candidates: int, exclude: float,
                        pooling: str, rng: random.Random) -> tuple[list[str], torch.Tensor]:
    """R_g: vocabulary words far from the concept. From vocabulary_words, drop every piece of the concept's
    words and of its held-out words (word_pieces: no 'nu', 'dity', 'naked', 'topless' for nudity), draw
    `n_candidates`, then drop the `exclude` fraction nearest to the concept (mean pooled cosine to the concept
    words, original encoder). Returns the words and their original pooled features [N, D'] (cached for Eq. 6)."""
    pieces = word_pieces(pipe.tokenizer, concept_words + held_out)
    words = [w for w in vocabulary_words(pipe.tokenizer) if w.lower() not in pieces]
    words = rng.sample(words, min(n_candidates, len(words)))
    features = torch.cat([common.pooled_features(pipe, words[i:i + 256], pipe.text_encoder, pooling)
                          for i in range(0, len(words), 256)])  # [N, D']
    concept = F.normalize(common.pooled_features(pipe, concept_words, pipe.text_encoder, pooling), dim=-1)
    nearness = (F.normalize(features, dim=-1) @ concept.T).mean(1)
    keep = nearness.argsort()[:len(words) - int(exclude * len(words))].sort().values
    if len(keep) < 2:
        common.die("fewer than 2 irrelevant vocabulary words are left for global retention; lower "
                   "--global_exclude or pass --no_global_retention.")
    return [words[i] for i in keep.tolist()], features[keep]


def similarity_matrix(features: torch.Tensor) -> torch.Tensor:
    """S: the cosine similarities of pooled features [N, D'] with each other, [N, N]."""
    unit = F.normalize(features, dim=-1)
    return unit @ unit.T


def global_retention_loss(features_trained, features_original, concept_feature=None):
    """Eq. (6): mean squared difference of the two similarity matrices (||.||_F^2 / N^2, so lambda_g does
    not depend on the batch); with `concept_feature`, each item's similarity to it is aligned too."""
    loss = F.mse_loss(similarity_matrix(features_trained), similarity_matrix(features_original))
    if concept_feature is not None:
        loss = loss + F.mse_loss(F.cosine_similarity(features_trained, concept_feature, dim=-1),
                                 F.cosine_similarity(features_original, concept_feature, dim=-1))
    return loss


def local_retention_loss(eps_trained, eps_original):
    """Eq. (7): the trained encoder's contexts must give the frozen U-Net the original predicted noise."""
    return F.mse_loss(eps_trained.float(), eps_original.float())


def unet_loss(loss_fn, unet, z_t, t, context, target, unet_batch: int):
    """loss_fn(U(z_t, t, context), target), a mean over rows [B, ...] (Eqs. 5 and 7), and its gradient
    w.r.t. the trained encoder's `context` [B, L, D], computed `unet_batch` rows at a time (each chunk's
    mean weighted by its share of the rows). Returns (loss, grad), detached."""
    def chunk_loss(context_rows, rows):
        eps = unet(z_t[rows], t, encoder_hidden_states=context_rows).sample
        return loss_fn(eps, target[rows]) * len(context_rows) / len(context)
    return common.rowwise_backward(chunk_loss, context, unet_batch)


# ---------------------------------------------------------------------------------------------
# main: cache the frozen things, then cycles of self-check and self-erasure with retention
# ---------------------------------------------------------------------------------------------
def check_args(args):
    """The combinations of flags (each flag alone is checked by LIMITS)."""
    if args.local_retention and min(args.local_batch, args.local_pool) < 1 and not args.keep_uncond:
        common.die("local retention needs --local_batch and --local_pool of at least 1, or --keep_uncond (or pass "
                   "--no_local_retention).")


def main(argv=None):
    args = common.parse_args(Args, argv, toy_defaults=TOY_DEFAULTS, limits=LIMITS)
    check_args(args)
    infos = common.concept_set(args)  # one concept, or several erased together
    common.several_concepts(infos, args)
    info = infos[0]
    # Several concepts (our extension; SAGE's paper erases one per run): every step draws a concept, then one of
    # its words; each word keeps its own boundary samples, and retention keeps what lies outside the whole set.
    words_of = {i["name"]: args.words or i["words"] for i in infos}
    words = args.words or info["words"] if len(infos) == 1 else list(dict.fromkeys(sum(words_of.values(), [])))
    held_out = [h for i in infos for h in i["held_out"]]
    out = common.erased_output("sage", infos, args)
    common.seed_everything(args.seed)
    rng, noise_gen = random.Random(args.seed), torch.Generator().manual_seed(args.seed)
    pipe = common.load_pipeline(args.model, device=args.device, start_from=args.start_from)
    pipe.sample_steps = args.sample_steps
    start, profile = time.time(), {}

    with common.phase(profile, "caching", pipe.device):
        frozen = pipe.text_encoder  # E_0; everything it computes is cached here, once
        with torch.no_grad():
            ids = {w: common.tokenize(pipe, [w]) for w in words}  # [1, L]
            eos = {w: common.eos_index(pipe, ids[w]) for w in words}  # [1]
            positions = torch.arange(ids[words[0]].shape[1], device=pipe.device)
            content = {w: (positions >= 1) & (positions < eos[w]) for w in words}  # the word's own tokens, [L]
            concept_embeds = {w: token_embeddings(frozen, ids[w]) for w in words}  # e = emb(c), [1, L, D]
            concept_ctx = {w: frozen(ids[w])[0] for w in words}  # E_0(c), [1, L, D]
            concept_feature = {w: common.pool(concept_ctx[w], eos[w], args.pooling, frozen) for w in words}  # pool(E_0(c))
            uncond_ctx = common.encode(pipe, [""])  # E_0(""), [1, L, D]
        retain_words, retain_features, local_words, local_ctx, nearest = [], None, [], None, None
        if args.global_retention or args.local_retention:
            retain_words, retain_features = irrelevant_concepts(pipe, words, held_out, args.global_candidates,
                                                                args.global_exclude, args.pooling, rng)
            # tau is a cosine threshold, so how similar unrelated words are under this encoder says where it should sit
            nearest = float(F.cosine_similarity(retain_features, concept_feature[words[0]], dim=-1).max())
            if args.self_check and nearest > args.tau:
                print(f"note: the irrelevant word nearest to '{words[0]}' has similarity {nearest:.2f} > --tau {args.tau}; "
                      f"the self-check may accept samples outside the concept domain (raise --tau).")
        if args.local_retention:
            local_words = [""] if args.keep_uncond else []
            local_words += rng.sample(retain_words, min(args.local_pool, len(retain_words)))
            with torch.no_grad():
                local_ctx = common.encode(pipe, local_words)  # E_0(r), [N_l, L, D]

    text_encoder = common.trainable_copy(frozen, transformer_weights)  # E_theta
    scaler = common.set_mixed_precision(pipe, args.mixed_precision)  # after the copy: E_theta stays fp32
    params = [p for p in text_encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=args.lr)
    buffer = collections.deque(maxlen=args.buffer_size)  # accepted boundary samples: (word, soft prompt [1, L, D])
    searches = accepted = 0
    n = args.batch_size

    with common.phase(profile, "training", pipe.device), common.autocast(pipe):
        bar = tqdm(range(args.iterations), desc="SAGE")
        for step in common.timed(bar, profile, pipe.device):
            word = rng.choice(words if len(infos) == 1 else words_of[rng.choice(infos)["name"]])
            logs = {}
            optimizer.zero_grad(set_to_none=True)
            if args.self_check and step >= args.warm_up and (step - args.warm_up) % args.check_every == 0:
                # Eqs. 1-2, cyclic: the search starts inside the domain, from the newest accepted sample of this word
                start_from = next((p for w, p in reversed(buffer) if w == word), concept_embeds[word])
                candidate = boundary_search(text_encoder, start_from, concept_embeds[word], content[word], eos[word],
                                            concept_feature[word], args.beta, args.delta, args.search_steps,
                                            args.step_size, args.init_noise, args.pooling, noise_gen)
                ok, similarity = self_check(text_encoder, candidate, eos[word], concept_feature[word], args.tau,
                                            args.pooling)
                searches, accepted = searches + 1, accepted + ok
                if ok:
                    buffer.append((word, candidate))
                logs.update(sim=f"{similarity:.3f}", buffer=len(buffer))

            stop = rng.randrange(args.ddim_steps)  # Eq. 3
            seeds = [rng.randrange(2**31) for _ in range(n)]
            with torch.no_grad():
                z_t, t = common.sample_until(pipe, concept_ctx[word].expand(n, -1, -1), uncond_ctx.expand(n, -1, -1),
                                             seeds, args.ddim_steps, stop, args.start_guidance)
                eps_uncond = pipe.unet(z_t, t, encoder_hidden_states=uncond_ctx.expand(n, -1, -1)).sample
                eps_concept = pipe.unet(z_t, t, encoder_hidden_states=concept_ctx[word].expand(n, -1, -1)).sample
                eps_target = negative_guidance_target(eps_uncond, eps_concept, args.negative_guidance)  # Eq. 4

            # Eq. 5 on the word and a few of its boundary samples; row j*n + i is prompt j with latent i
            boundary = [p for w, p in buffer if w == word]
            prompts = torch.cat([concept_embeds[word],
                                 *rng.sample(boundary, min(args.boundary_per_step, len(boundary)))])
            context = common.text_forward(text_encoder, prompts).repeat_interleave(n, 0)
            k = len(prompts)
            # the U-Net part of the loss goes through in chunks; its gradient w.r.t. the context then flows on
            # through the text encoder in one backward pass (the surrogate below has exactly that gradient)
            loss_erase, grad_context = unet_loss(self_erasure_loss, pipe.unet, z_t.repeat(k, 1, 1, 1), t, context,
                                                eps_target.repeat(k, 1, 1, 1), args.unet_batch)
            loss, surrogate = loss_erase, (context * grad_context).sum()
            logs.update(erase=f"{loss_erase.item():.4f}")

            if args.global_retention:  # Eq. 6
                index = rng.sample(range(len(retain_words)), min(args.global_batch, len(retain_words)))
                features = common.pooled_features(pipe, [retain_words[i] for i in index], text_encoder, args.pooling)
                loss_glob = global_retention_loss(features, retain_features[index],
                                                  concept_feature[word] if args.with_concept_similarity else None)
                loss = loss + args.lambda_g * loss_glob.detach()
                # its gradient now, so that the text encoder's graph for --global_batch prompts (~7 GB at SD
                # size) is freed before Eq. 7's U-Net rows; the gradients add up to Eq. 8's all the same
                scaler.scale(args.lambda_g * loss_glob).backward()
                logs.update(glob=f"{loss_glob.item():.2e}")

            if args.local_retention:  # Eq. 7, on the same z_t
                first = 1 if args.keep_uncond else 0
                index = list(range(first)) + rng.sample(range(first, len(local_words)),
                                                        min(args.local_batch, len(local_words) - first))
                k = len(index)
                with torch.no_grad():
                    eps_original = pipe.unet(z_t.repeat(k, 1, 1, 1), t,
                                             encoder_hidden_states=local_ctx[index].repeat_interleave(n, 0)).sample
                trained_ctx = common.encode(pipe, [local_words[i] for i in index], text_encoder).repeat_interleave(n, 0)
                loss_loc, grad_ctx = unet_loss(local_retention_loss, pipe.unet, z_t.repeat(k, 1, 1, 1), t,
                                               trained_ctx, eps_original, args.unet_batch)
                loss = loss + args.lambda_l * loss_loc
                surrogate = surrogate + args.lambda_l * (trained_ctx * grad_ctx).sum()
                logs.update(loc=f"{loss_loc.item():.4f}")

            if not torch.isfinite(loss):
                common.die(f"the loss became NaN at step {step}; nothing was written. Lower --lr.")
            scaler.scale(surrogate).backward()  # with Eq. 6's above: d surrogate / d theta = d L / d theta (Eq. 8)
            scaler.step(optimizer)
            scaler.update()
            bar.set_postfix(logs)

    common.release(optimizer)
    text_encoder.eval()
    sample_prompts = args.samples or [info["templates"][1].format(w) for w in
                                      [words[0], *info["held_out"][:1], *info["near"][:1]]]
    if len(infos) > 1 and not args.samples:  # one picture per erased concept
        sample_prompts = [i["templates"][1].format(words_of[i["name"]][0]) for i in infos]
        words = words_of  # config.json: each concept's words
    with common.phase(profile, "samples", pipe.device):
        samples = common.before_after(pipe, sample_prompts, list(range(len(sample_prompts))), text_encoder=text_encoder)
    tensors = common.changed_tensors("text_encoder", text_encoder, frozen)
    saved = common.save_erased(out, tensors, "sage", args, pipe, time.time() - start, samples,
                               extra=dict(words=words, searches=searches, accepted=accepted,
                                          boundary_buffer=len(buffer), irrelevant_concepts=len(retain_words),
                                          nearest_irrelevant_similarity=nearest,
                                          local_prompts=len(local_words), trained_tensors=len(params),
                                          peak_memory_mb=common.profile_peak(profile), profile=profile))
    print(f"wrote {saved} ({len(tensors)} of {len(params)} text-encoder tensors changed; "
          f"self-check accepted {accepted} of {searches} boundary samples)")


if __name__ == "__main__":
    main()
