"""sdscale.py: a full-size Stable Diffusion v1.4 with random weights, for measuring memory and cost.

SD v1.4's weights cannot be downloaded on the machines that build this project, but its *shapes* can
be rebuilt exactly: the configs below are those of CompVis/stable-diffusion-v1-4 (U-Net 320/640/1280/1280,
2 layers per block, 8 heads, 768-wide context; VAE 128/256/512/512; CLIP ViT-L/14 text encoder, 12
layers, quick_gelu) and the tokenizer is the real CLIP BPE tokenizer (49,408 tokens), rebuilt offline
from the merges file that ships inside the `open-clip-torch` wheel. Such a pipeline has SD v1.4's
memory footprint and cost (its images are noise), so `benchmark.py --scale sd` measures every method on
it, and the tests use the same tokenizer on a narrow model.

    python sdscale.py --output outputs/sd14-random                # ~4 GB on disk, ~1 min
    python sdscale.py --narrow --output /tmp/narrow               # the tests' narrow model, seconds
    pip download --no-deps open-clip-torch==3.3.0 -d /tmp/oc     # only for --bpe; never installed

The tokenizer files built from that wheel are committed under assets/clip_tokenizer/ (vocab.json,
merges.txt), so the command above needs no download; `python sdscale.py --tokenizer_only --bpe
/tmp/oc/open_clip_torch-3.3.0-py3-none-any.whl` rebuilds them and checks them.
"""
import dataclasses
import gzip
import json
import zipfile
from pathlib import Path

import torch

import common

TOKENIZER_DIR = common.HERE / "assets" / "clip_tokenizer"
N_MERGES = 49152 - 256 - 2  # CLIP's SimpleTokenizer keeps merges[1 : 49152 - 256 - 2 + 1]: 48,894 of them
KNOWN_IDS = {"a photo of a": [49406, 320, 1125, 539, 320, 49407]}  # CLIP ViT-L/14's ids for this prompt


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible map from the 256 byte values to printable unicode characters: printable
    bytes map to themselves, the others to chr(256 + n) in byte order. Its value order is vocab ids 0..255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def read_bpe_merges(source: Path) -> list[str]:
    """The lines of bpe_simple_vocab_16e6.txt.gz, read from the .gz itself or from an open-clip-torch
    wheel that contains it. Raises SystemExit (one sentence) if neither holds it."""
    source = Path(source)
    try:
        if source.suffix == ".whl":
            with zipfile.ZipFile(source) as wheel:
                name = next(n for n in wheel.namelist() if n.endswith("bpe_simple_vocab_16e6.txt.gz"))
                data = gzip.decompress(wheel.read(name))
        else:
            data = gzip.open(source).read()
    except (OSError, StopIteration, zipfile.BadZipFile, gzip.BadGzipFile):
        common.die(f"{source} is neither bpe_simple_vocab_16e6.txt.gz nor an open-clip-torch wheel holding it; "
                   f"fetch one with: pip download --no-deps open-clip-torch -d /tmp/oc")
    return data.decode("utf-8").split("\n")


def build_clip_tokenizer(bpe_source: Path, out: Path) -> Path:
    """Write vocab.json and merges.txt of the CLIP BPE tokenizer (HF CLIPTokenizer layout) into `out`.
    Vocabulary, in id order (as CLIP's SimpleTokenizer builds it): the 256 byte symbols, the same with
    '</w>', one symbol per merge (first 48,894 merges), then <|startoftext|> and <|endoftext|>: 49,408 ids."""
    merges = [tuple(line.split()) for line in read_bpe_merges(bpe_source)[1:N_MERGES + 1] if line.strip()]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    check_tokenizer(load_clip_tokenizer(out))
    return out


def load_clip_tokenizer(folder: Path = TOKENIZER_DIR):
    """The real CLIP tokenizer (77 tokens) from vocab.json + merges.txt in `folder`."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(Path(folder) / "vocab.json"), str(Path(folder) / "merges.txt"), model_max_length=77)


def check_tokenizer(tokenizer):
    """Raise SystemExit unless the tokenizer has 49,408 ids and encodes KNOWN_IDS as CLIP does."""
    if len(tokenizer) != 49408:
        common.die(f"the rebuilt CLIP tokenizer has {len(tokenizer)} ids, not 49,408.")
    for text, ids in KNOWN_IDS.items():
        if tokenizer(text).input_ids != ids:
            common.die(f"the rebuilt CLIP tokenizer encodes '{text}' as {tokenizer(text).input_ids}, not {ids}.")


# CompVis/stable-diffusion-v1-4's component configs (unet/, vae/, text_encoder/ config.json), the values
# that are not the diffusers / transformers defaults written out.
UNET_CONFIG = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                   block_out_channels=(320, 640, 1280, 1280),
                   down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                   up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                   cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2,
                  block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32)
TEXT_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                   projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1)
SCHEDULER_CONFIG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
                        steps_offset=1, skip_prk_steps=True)
# SD v1.4's scheduler_config.json also holds clip_sample=false, which PNDM ignores but DDIM (common.load_pipeline's
# sampler, built from this config) reads: without it DDIM would clip x0 to [-1, 1].


# The tests' narrow model: SD v1.4's interface (77 tokens, 768-wide context, 4-channel latents, 16 attn2 layers in
# the same arrangement, the real tokenizer) with 8-16 U-Net channels, a 4-channel VAE and one text layer.
NARROW = dict(unet_config=dict(UNET_CONFIG, sample_size=8, block_out_channels=(8, 16, 16, 16), attention_head_dim=2,
                               norm_num_groups=4),
              vae_config=dict(VAE_CONFIG, sample_size=64, block_out_channels=(4, 4, 4, 4), layers_per_block=1,
                              norm_num_groups=2),
              text_config=dict(TEXT_CONFIG, intermediate_size=64, num_hidden_layers=1))


def build_pipeline(out: Path, unet_config=UNET_CONFIG, vae_config=VAE_CONFIG, text_config=TEXT_CONFIG,
                   tokenizer_dir: Path = TOKENIZER_DIR, seed: int = 0) -> Path:
    """Save a randomly initialised StableDiffusionPipeline (diffusers layout, safetensors) into `out`:
    SD v1.4's configs by default, narrower ones (NARROW) for tests. The scheduler is SD v1.4's PNDM schedule."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    scheduler = PNDMScheduler(**SCHEDULER_CONFIG)
    scheduler.register_to_config(clip_sample=False)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**vae_config), text_encoder=CLIPTextModel(CLIPTextConfig(**text_config)),
        tokenizer=load_clip_tokenizer(tokenizer_dir), unet=UNet2DConditionModel(**unet_config),
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    return Path(out)


@dataclasses.dataclass
class Args:
    output: str = "outputs/sd14-random"
    """folder for the pipeline (diffusers layout); refused if it holds anything else"""
    bpe: str | None = None
    """an open-clip-torch wheel or its bpe_simple_vocab_16e6.txt.gz: rebuild assets/clip_tokenizer from it"""
    tokenizer_only: bool = False
    """only (re)build and check the tokenizer files (needs --bpe)"""
    narrow: bool = False
    """build the tests' narrow model instead (SD v1.4's interface and tokenizer, 8-16 channels; seconds)"""


def main(argv=None):
    args = common.parse_args(Args, argv)
    if args.tokenizer_only and not args.bpe:
        common.die("--tokenizer_only rebuilds the tokenizer from --bpe; pass --bpe <open-clip-torch wheel>.")
    if args.bpe:
        build_clip_tokenizer(Path(args.bpe), TOKENIZER_DIR)
        print(f"wrote {TOKENIZER_DIR} (49,408 ids; 'a photo of a' -> {KNOWN_IDS['a photo of a']})")
        if args.tokenizer_only:
            return
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        common.die(f"--output {out} is a file; choose a folder.")
    if out.exists() and any(out.iterdir()) and not (out / "model_index.json").exists():
        common.die(f"{out} exists and is not a pipeline folder; choose another --output.")
    common.atomic_save_dir(out, lambda tmp: build_pipeline(tmp, **(NARROW if args.narrow else {})))
    n = sum(p.numel() for p in common.load_pipeline(str(out), device="cpu").unet.parameters())
    print(f"wrote {out}: SD v1.4's {'interface, narrow' if args.narrow else 'configs'}, random weights "
          f"({n / 1e6:.1f} M U-Net parameters), real CLIP tokenizer")


if __name__ == "__main__":
    main()
