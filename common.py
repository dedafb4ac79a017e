"""The one shared module: loading, prompt encoding, DDIM sampling, the erased-model format, CLI.

Every method file imports only this.  Conventions used throughout:
- `pipe` is a diffusers StableDiffusionPipeline holding the *frozen original* components; a
  method trains a copy (`copy.deepcopy(pipe.unet)` or of `pipe.text_encoder`).
- Latents start from one CPU generator per seed, so an image depends on its seed only (not on the
  batch it was drawn in, nor on the device).
- An erased model is a folder: `erased.safetensors` (changed tensors only, keys prefixed `unet.` or
  `text_encoder.`), `config.json` and `samples.png`.
"""
import ast
import contextlib
import copy
import dataclasses
import hashlib
import inspect
import json
import math
import os
import platform
import random
import re
import resource
import shutil
import sys
import tempfile
import textwrap
import time
import typing
from pathlib import Path

# transformers prints two notices about torchvision (not needed here) on every import of the pipeline; silence
# them before it is first imported (a user's own TRANSFORMERS_VERBOSITY wins)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
TOY_DIR = HERE / "assets" / "toy"
SD14 = "CompVis/stable-diffusion-v1-4"
TOY_SAMPLING = {"steps": 25, "guidance": 3.0}  # guidance chosen on held-apart seeds: docs/toyworld.md
SD_SAMPLING = {"steps": 50, "guidance": 7.5}
SD_GENERATE_BATCH = 8  # images per sampling batch at SD scale (16 U-Net rows with guidance), measured to fit 24 GB
FORMAT = "concept-erasure/1"


class UserError(SystemExit):
    """A mistake the user can fix: exits with status 2 (as argparse does for a bad flag); str() is the sentence."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self):
        return self.message


# True in a process whose mistakes another process reports (evaluate.py's processes r > 0 under torchrun, which
# meet the same mistake as process 0): die then stops it quietly, with the same exit status.
QUIET_ERRORS = False


def die(message: str):
    """Stop with one sentence for the user instead of a traceback: one line on stderr, exit status 2 (no line when
    QUIET_ERRORS)."""
    line = "error: " + " ".join(str(message).split())
    for bar in list(getattr(tqdm, "_instances", [])):  # end any progress bar's line first, so the error has its own
        bar.close()
    if not QUIET_ERRORS:
        print(line, file=sys.stderr, flush=True)
    raise UserError(line)


# ---------------------------------------------------------------------------------------------
# @dataclass Args -> command line (the docstring under each field is its --help text)
# ---------------------------------------------------------------------------------------------
def field_docs(cls) -> dict:
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body, docs = tree.body[0].body, {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def parse_args(cls, argv=None, toy_defaults: dict | None = None, limits: dict | None = None):
    """Parse argv into `cls`; when --model is 'toy', `toy_defaults` replace defaults not given. Every value is
    then checked by check_args (the shared rules and `limits`), so that a bad flag stops here, before anything
    loads, with one sentence and exit status 2."""
    import argparse

    class OneLineParser(argparse.ArgumentParser):
        def error(self, message):  # argparse's own refusals (unknown flag, 'x' for an int) as one line too
            die(f"{message} (see --help).")

    toy_defaults, docs = toy_defaults or {}, field_docs(cls)
    parser = OneLineParser(description=(sys.modules[cls.__module__].__doc__ or "").split("\n")[0])
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind, required = hints[f.name], f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        help_text = docs.get(f.name, "") + (" (required)" if required else f" (default: {default}" + (
            f"; toy: {toy_defaults[f.name]})" if f.name in toy_defaults else ")"))
        help_text = help_text.replace("%", "%%")  # argparse formats help with %
        if kind is bool:
            parser.add_argument(f"--{f.name}", dest=f.name, action="store_true", default=argparse.SUPPRESS, help=help_text)
            parser.add_argument(f"--no_{f.name}", dest=f.name, action="store_false", default=argparse.SUPPRESS,
                                help=f"turn --{f.name} off")
            continue
        args = typing.get_args(kind)
        if str in args and list[str] in args:  # `str | list[str]`: the flag may be repeated (--concept a --concept b)
            parser.add_argument(f"--{f.name}", type=str, action="append", default=argparse.SUPPRESS, help=help_text)
        elif typing.get_origin(kind) is list:
            parser.add_argument(f"--{f.name}", type=args[0], nargs="*", default=argparse.SUPPRESS, help=help_text)
        else:
            base = next((a for a in args if a is not type(None)), kind)  # Optional[X] -> X
            parser.add_argument(f"--{f.name}", type=base, default=argparse.SUPPRESS, help=help_text, required=required)
    given = vars(parser.parse_args(argv))
    for name, value in given.items():  # a repeatable flag given once stays one text: the single-concept path
        if isinstance(value, list) and len(value) == 1 and {str, list[str]} <= set(typing.get_args(hints[name])):
            given[name] = value[0]
    toy = given.get("model", getattr(cls, "model", None)) == "toy"
    args = cls(**{**(toy_defaults if toy else {}), **given})
    if getattr(args, "concept_file", None):
        entries = read_concept_files(args.concept_file)
        if len(entries) > 1 and getattr(args, "concept", None):
            die(f"--concept_file {args.concept_file} holds {len(entries)} concepts, which name themselves; leave "
                f"--concept out (or repeat --concept for built-in concepts without the file).")
        if len(entries) == 1 and isinstance(getattr(args, "concept", None), list):
            die(f"--concept_file {args.concept_file} describes one concept, and --concept names {len(args.concept)}; "
                f"to erase several described concepts, put them in one file as a JSON list (docs/concepts.md).")
        if not getattr(args, "concept", None):  # --concept_file alone names the concept(s)
            args.concept = entries[0]["name"] if len(entries) == 1 else [e["name"] for e in entries]
    check_args(args, limits)
    return args


# ---------------------------------------------------------------------------------------------
# Checking every flag before anything heavy happens
# ---------------------------------------------------------------------------------------------
def check_args(args, limits: dict | None = None):
    """Check every flag of `args` (a dataclass or an argparse namespace); stop at the first bad one with one
    sentence. Rules every script shares, by field name: --concept is one concept, not empty, without a comma
    (or --concept_file names it); --kind is a kind; --concept_file is a valid concept file;
    --device is a device this machine has; a local --model folder holds a whole pipeline; every float is
    finite. Then `limits`, {field: rule}, with rules
        '> 0', '>= 1', '<= 1', '< 1'        a bound
        '[0, 1)', '(0, 1]', '[1, 1000]'     an interval
        ('last', 'tail')                    the allowed values
        'file'                              an existing file
        'non-empty'                         a text that is not blank
        'erased model'                      an erased-model folder (written by a method script)
        'erased-model output'               a folder an erased model may be written to
    A list is checked entry by entry; None (a default decided later) is not checked."""
    values = vars(args)
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            die(f"--{name} must be a finite number, not {value}.")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**62:
            die(f"--{name} is too large: {value}.")
    if "concept" in values and values["concept"] is None and not values.get("concept_file"):
        die("name the concept to erase: --concept NAME (e.g. --concept nudity), or --concept_file FILE.json.")
    if isinstance(values.get("concept"), str):
        check_concept(values["concept"])
    if isinstance(values.get("concept"), list):
        for concept in values["concept"]:
            check_concept(concept)
        names = [c.strip().lower() for c in values["concept"]]
        if len(set(names)) < len(names):
            twice = next(n for n in names if names.count(n) > 1)
            die(f"--concept '{twice}' is given twice; name each concept once.")
    if isinstance(values.get("kind"), str):
        args.kind = values["kind"] = values["kind"].strip().lower()
    if values.get("kind") == "colour" and values.get("model") == "toy":
        pass  # the miniature world's colours: concept_info checks it against the world
    elif values.get("kind") is not None and values["kind"] not in KINDS:
        die(f"--kind must be one of {', '.join(KINDS)}, not '{values['kind']}'.")
    if values.get("concept_file"):
        read_concept_files(values["concept_file"])
    if values.get("device") is not None:
        check_device(values["device"])
    if values.get("mixed_precision") == "fp16" and not str(values.get("device") or default_device()).startswith("cuda"):
        die("--mixed_precision fp16 needs a CUDA GPU (a CPU's fp16 kernels are ~200x slower than its bf16 ones); "
            "on a CPU pass --mixed_precision bf16, which takes the same memory.")
    if isinstance(values.get("model"), str) and values["model"] != "toy":
        check_model_path(values["model"])
    for name, rule in (limits or {}).items():
        if name not in values:
            raise KeyError(f"limits name '{name}', which is not a field of {type(args).__name__}")
        if values[name] is not None:
            check_value(name, values[name], rule, values)


def check_value(name: str, value, rule, values: dict):
    """One flag against one rule of check_args (a list: every entry)."""
    flag = f"--{name}"
    for item in value if isinstance(value, list) else [value]:
        if isinstance(rule, tuple):
            if item not in rule:
                die(f"{flag} must be one of {', '.join(map(str, rule))}, not '{item}'.")
        elif rule == "file":
            if not Path(item).is_file():
                die(f"{flag} {item}: no such file.")
        elif rule == "non-empty":
            if not str(item).strip():
                die(f"{flag} must not be empty.")
        elif rule == "erased model":
            read_erased_config(item)
        elif rule == "erased-model output":
            check_output(item, values.get("model") or "")
        else:
            inside, described = in_bounds(item, rule)
            if not inside:
                die(f"{flag} must be {described}, not {item}.")


def in_bounds(value: float, rule: str) -> tuple[bool, str]:
    """Whether `value` satisfies a bound ('>= 1') or an interval ('[0, 1)'), and the rule in words."""
    interval = re.fullmatch(r"([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])", rule.strip())
    if interval:
        left, low, high, right = interval.groups()
        low, high = float(low), float(high)
        ok = (value >= low if left == "[" else value > low) and (value <= high if right == "]" else value < high)
        return ok, f"in {rule.strip()}"
    bound = re.fullmatch(r"(>=|>|<=|<)\s*(\S+)", rule.strip())
    if not bound:
        raise ValueError(f"not a rule of check_args: {rule!r}")
    op, limit = bound.group(1), float(bound.group(2))
    ok = {">=": value >= limit, ">": value > limit, "<=": value <= limit, "<": value < limit}[op]
    return ok, f"{op} {bound.group(2)}"


def check_concept(concept: str):
    """One concept per --concept: not blank, and no comma (several concepts: repeat the flag)."""
    if not concept.strip():
        die("--concept is empty; name the concept to erase, e.g. --concept nudity.")
    if "," in concept:
        names = [c.strip() for c in concept.split(",") if c.strip()] or [concept]
        repeated = " ".join(f"--concept '{name}'" for name in names[:3])
        die(f"--concept takes one concept, and '{concept}' has a comma: to erase several concepts in one run, "
            f"repeat the flag ({repeated}), or write a single concept without the comma.")


def check_device(device: str):
    """`device` must exist on this machine; otherwise one sentence saying what to pass instead."""
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    here = "cpu" + (f" and cuda (cuda:0..cuda:{cuda - 1})" if cuda else "")
    try:
        kind = torch.device(device)
    except (RuntimeError, ValueError):
        die(f"--device '{device}' is not a device name; this machine has {here}.")
    if kind.type == "cuda" and not cuda:
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}, but finds no GPU"
        die(f"--device {device} needs a CUDA GPU, and this machine has none (torch {torch.__version__} is {build}); "
            f"pass --device cpu or leave --device out.")
    if kind.type == "cuda" and kind.index is not None and kind.index >= cuda:
        die(f"--device {device}: this machine has {cuda} CUDA device(s), cuda:0..cuda:{cuda - 1}.")
    if kind.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        die(f"--device {device}: Apple's MPS is not available here; this machine has {here}.")
    if kind.type not in ("cpu", "cuda", "mps"):
        die(f"--device {device} is not supported; this machine has {here}.")


def check_model_path(model: str):
    """A --model that is a local folder must hold a whole pipeline; one that reads as a path must exist."""
    if Path(model).exists():
        check_pipeline_folder(Path(model), model)
    elif model.startswith(("/", "./", "../", "~", ".\\")) or "\\" in model or model.count("/") > 1:
        die(f"--model {model}: no such folder; pass a local copy of the pipeline or a hub id such as {SD14}.")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_pipeline(model: str = "toy", erased=None, device: str | None = None, dtype=torch.float32, start_from=None):
    """An SD v1.x pipeline (hub id or local path) or the miniature model ('toy'), frozen, with a
    DDIM scheduler; `erased` is an erased-model folder to apply on top. `start_from` (a method's --start_from) is
    one too, applied the same way, and remembered as `pipe.start_from` (its folder, config and the base's own
    values of its tensors), so that save_erased writes the union of its tensors and the new run's (sequential
    erasure, docs/concepts.md). Either is refused (common.die) when it was erased from other weights."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    path = str(TOY_DIR) if model == "toy" else model
    if Path(path).exists():
        check_pipeline_folder(Path(path), model)
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    kwargs = dict(safety_checker=None, requires_safety_checker=False, dtype=dtype)
    offline = f"could not load '{model}'; with no network, download the pipeline elsewhere and pass its local folder: --model /path/to/stable-diffusion-v1-4"
    try:  # the local cache first, so that a downloaded model loads with no network at all
        pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True, **kwargs)
    except Exception as exc:
        if Path(path).exists():  # every file is there (check_pipeline_folder), so say what diffusers found wrong
            die(f"could not load the local pipeline '{model}': {type(exc).__name__}: {str(exc)[:300]}")
        if os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable():
            die(offline)
        try:
            pipe = StableDiffusionPipeline.from_pretrained(path, **kwargs)
        except Exception as exc:
            die(f"{offline} ({type(exc).__name__})")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for part in (pipe.vae, pipe.text_encoder, pipe.unet):
        part.eval().requires_grad_(False)
    # a local folder is recorded by its absolute path, so that an erased model names it from any folder
    pipe.base_model = "toy" if Path(path).resolve() == TOY_DIR else (
        str(Path(path).resolve()) if Path(path).exists() else model)
    if pipe.base_model == "toy" and str(device or default_device()) == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # the miniature model's many small kernels run as fast on one thread as on two, and two threads
        # slow to a crawl (10-50x) as soon as another process shares the cores
        torch.set_num_threads(1)
    if erased is not None:
        load_erased(pipe, erased)
    if start_from is not None:
        base_values = {}  # the base's own values of the start model's tensors: the saved model's fingerprint
        config = load_erased(pipe, start_from, base_values)
        pipe.start_from = dict(folder=Path(start_from).resolve(), config=config, base_values=base_values)
    return pipe.to(device or default_device())


# The weight files diffusers / transformers read from a pipeline folder (one of them, or a sharded index).
WEIGHT_FILES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}


def check_pipeline_folder(path: Path, model: str):
    """A local diffusers pipeline folder: model_index.json, and each part's folder with its config and, for the
    networks, its weight file (all shards of a sharded one). Stops with one sentence naming what is missing."""
    if not (path / "model_index.json").is_file():
        die(f"'{model}' is a folder but not a diffusers pipeline (no model_index.json).")
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError):
        die(f"{path / 'model_index.json'} is not readable JSON; copy it again from the original download.")
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (index.get(part) or [None])[0]:
            die(f"'{model}' has no {part} in its model_index.json, so it is not a Stable Diffusion pipeline.")
        folder = path / part
        if not folder.is_dir() or not any(folder.iterdir()):
            die(f"'{model}' is missing its {part}/ folder; copy it from the original download.")
        if part not in WEIGHT_FILES:
            continue
        if not (folder / "config.json").is_file():
            die(f"'{model}' is missing {part}/config.json; copy it from the original download.")
        stem = WEIGHT_FILES[part]
        names = [f"{stem}.safetensors", f"{stem}.bin"] + (["pytorch_model.bin"] if part == "text_encoder" else [])
        if any((folder / n).is_file() for n in names):
            continue
        shard_index = next((folder / f"{n}.index.json" for n in names if (folder / f"{n}.index.json").is_file()), None)
        if shard_index is None:
            die(f"'{model}' is missing the weights of its {part}: {part}/{names[0]} (or {names[1]}) is not there; "
                f"copy it from the original download.")
        try:
            shards = sorted(set(json.loads(shard_index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError):
            die(f"{shard_index} is not a readable shard index; copy it again from the original download.")
        for shard in shards:
            if not (folder / shard).is_file():
                die(f"'{model}' is missing {part}/{shard}, one of the shards listed in {shard_index.name}; copy it "
                    f"from the original download.")


def hub_reachable(timeout: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def sampling_defaults(pipe) -> dict:
    """DDIM steps and guidance for pictures; `pipe.sample_steps` (a method's --sample_steps) overrides the steps."""
    defaults = dict(TOY_SAMPLING if pipe.base_model == "toy" else SD_SAMPLING)
    if getattr(pipe, "sample_steps", None):
        defaults["steps"] = pipe.sample_steps
    return defaults


# ---------------------------------------------------------------------------------------------
# Concepts: what every method and evaluate.py need to know about the concept being erased
# ---------------------------------------------------------------------------------------------
WORLD_FILE = HERE / "assets" / "world.json"
CONCEPTS_DIR = HERE / "concepts"  # one concept file per built-in SD concept: concepts/<name>.json
KINDS = ("object", "style", "nudity")  # the kinds the papers distinguish (--kind); the miniature world's are object, colour
# What a concept of each kind gets when its file (or the command line) does not say: the anchor (ESD/UCE's
# neutral target; UCE's official guide for artists is "art") and the caption templates its prompts fill.
KIND_ANCHORS = {"object": "", "style": "art", "nudity": ""}
KIND_TEMPLATES = {"object": ["a photo of a {}", "a {} in the city", "a painting of a {}"],
                  "style": ["a painting in the style of {}", "a landscape by {}", "a portrait by {}"],
                  "nudity": ["a photo of {}", "a painting of {}", "{} person on a beach"]}
# A concept file is one JSON object with these keys (docs/concepts.md). name, kind, words are required.
CONCEPT_KEYS = dict(
    name="the concept's name (output folders, reports)", kind="object, style or nudity",
    about="a comment for the reader", words="prompts that name the concept: what a method erases",
    held_out="words for the same concept that no method trains on (evaluation: generality)",
    near="near concepts that must survive (evaluation: specificity)",
    others="other concepts, far from this one (evaluation: far specificity)",
    anchor="the neutral target a method maps the concept to (ESD, UCE, RealEra)",
    anchors="a different anchor per method, {method: anchor}, e.g. {\"domain_correction\": \"painting\"}",
    templates="caption templates with one {} where a word goes",
    related="S-GRACE's related words R (its concept space)", unrelated="S-GRACE's unrelated words U",
    preserve="RealEra's real irrelevant prompts (beyond-concept regularisation)")


def read_concept_files(path, label: str | None = None) -> list[dict]:
    """The concepts of a concept file, checked and completed (concept_entry): one JSON object describes one
    concept, a JSON list of such objects describes a set erased together (docs/concepts.md). Bad content stops
    with one sentence naming the file, the entry and the key (common.die)."""
    path = Path(path)
    label = label or f"--concept_file {path}"  # how a refusal names the file

    def no_repeats(pairs):  # a key given twice would silently keep the last one
        keys = [k for k, _ in pairs]
        repeated = next((k for k in keys if keys.count(k) > 1), None)
        if repeated:
            die(f"{label} gives the key '{repeated}' twice in one concept; give it once.")
        return dict(pairs)

    if path.is_dir():
        die(f"{label} is a folder; pass one JSON file (e.g. concepts/nudity.json).")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError:
        die(f"{label}: no such file.")
    except UnicodeDecodeError:
        die(f"{label} is not UTF-8 text; save it as UTF-8 JSON.")
    try:
        content = json.loads(text, object_pairs_hook=no_repeats)
    except ValueError as error:
        die(f"{label} is not valid JSON ({error}).")
    if isinstance(content, dict):
        return [concept_entry(content, label)]
    if not isinstance(content, list) or not content:
        die(f"{label} must hold one JSON object {{\"name\": ..., \"kind\": ..., \"words\": [...]}}, "
            f"or a non-empty list of them (several concepts erased together).")
    entries = [concept_entry(entry, f"{label} (entry {i + 1})") for i, entry in enumerate(content)]
    names = [e["name"] for e in entries]
    if len(set(names)) < len(names):
        die(f"{label} names '{next(n for n in names if names.count(n) > 1)}' twice; name each concept once.")
    return entries


def read_concept_file(path, label: str | None = None) -> dict:
    """A concept file describing one concept (read_concept_files), checked and completed. A file holding a list
    of several concepts stops with one sentence (common.die)."""
    entries = read_concept_files(path, label)
    if len(entries) > 1:
        die(f"{label or path} holds {len(entries)} concepts; this needs one.")
    return entries[0]


def concept_entry(entry, path: str) -> dict:
    """One concept object (format: CONCEPT_KEYS, docs/concepts.md) checked and completed: every optional key
    present, filled from the kind's defaults (KIND_ANCHORS, KIND_TEMPLATES). `path` names it in a refusal
    (one sentence, common.die)."""
    if not isinstance(entry, dict):
        die(f"{path} must hold one JSON object {{\"name\": ..., \"kind\": ..., \"words\": [...]}}.")
    unknown = [k for k in entry if k not in CONCEPT_KEYS]
    if unknown:
        die(f"{path}: unknown key '{unknown[0]}'; a concept file may have {', '.join(CONCEPT_KEYS)}.")
    for key in ("name", "kind", "words"):
        if not entry.get(key):
            die(f"{path} needs '{key}' ({CONCEPT_KEYS[key]}).")
    if isinstance(entry["kind"], str):
        entry["kind"] = entry["kind"].strip().lower()  # as --kind: "Style" is style
    if entry["kind"] not in KINDS:
        die(f"{path}: 'kind' must be one of {', '.join(KINDS)}, not '{entry['kind']}'.")
    methods = ("esd", "uce", "sage", "realera", "domain_correction", "sgrace")
    unknown = [m for m in entry.get("anchors", {}) if m not in methods] if isinstance(entry.get("anchors"), dict) else []
    if unknown:
        die(f"{path}: 'anchors' names '{unknown[0]}', which is not a method; use {', '.join(methods)}.")
    for key, value in entry.items():
        text_list = isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value)
        if key in ("name", "kind", "about", "anchor") and not isinstance(value, str):
            die(f"{path}: '{key}' must be a text.")
        if key == "anchors" and not (isinstance(value, dict) and all(isinstance(v, str) for v in value.values())):
            die(f"{path}: 'anchors' must map method names to anchor texts.")
        if key not in ("name", "kind", "about", "anchor", "anchors") and not text_list:
            die(f"{path}: '{key}' must be a list of non-empty texts.")
        if key in ("related", "unrelated", "preserve") and not value:
            die(f"{path}: '{key}' is an empty list; leave the key out to use the method's own.")
    if "templates" in entry and not all(t.count("{}") == 1 for t in entry["templates"]):
        die(f"{path}: every template needs exactly one '{{}}' where the word goes.")
    if "templates" in entry and len(entry["templates"]) < 2:
        die(f"{path}: give at least two templates (the methods' samples.png fills the second), or "
            f"leave 'templates' out to take the kind's.")
    if "," in entry["name"]:  # a file has no --concept to repeat: say how the file itself is written
        names = [repr(c.strip()) for c in entry["name"].split(",") if c.strip()]
        both = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else ""
        die(f"{path}: the name '{entry['name']}' has a comma; write it without the comma" +
            (f", or, to erase {both} together, give each its own entry in a JSON list (docs/concepts.md)" if both
             else "") + ".")
    check_concept(entry["name"])
    kind = entry["kind"]
    return dict(name=entry["name"].strip().lower(), kind=kind, words=list(entry["words"]),
                held_out=entry.get("held_out", []), near=entry.get("near", []), others=entry.get("others"),
                anchor=entry.get("anchor", KIND_ANCHORS[kind]), anchors=dict(entry.get("anchors", {})),
                templates=entry.get("templates", list(KIND_TEMPLATES[kind])), related=entry.get("related"),
                unrelated=entry.get("unrelated"), preserve=entry.get("preserve"))


def builtin_concepts() -> dict:
    """{name: completed entry} for the concept files in concepts/ (SD v1.4's built-in concepts). A broken file
    there stops with one sentence naming it (it was edited by hand: the flag a user passed is not to blame)."""
    entries = [read_concept_file(p, label=f"the built-in concept file {p.relative_to(HERE)}")
               for p in sorted(CONCEPTS_DIR.glob("*.json"))]
    return {e["name"]: e for e in entries}


def concept_info(concept: str, model: str, kind: str | None = None, concept_file: str | None = None) -> dict:
    """What every method and evaluate.py need to know about the concept: its name, kind, words, held-out words,
    near neighbours, other concepts (retention / far specificity), anchor, per-method anchors, caption templates,
    and S-GRACE's / RealEra's optional lists (None when not given).
    Miniature model: from assets/world.json (every object and colour; kinds object and colour).
    SD: from `concept_file`, else the built-in concepts/<name>.json, else a bare concept of kind `kind` (its
    words are just `concept`). `kind` beats the file's kind; `concept` (when given) beats the file's name.
    Raises (common.die, one sentence): an unknown miniature-world concept; an SD concept that is neither built
    in nor described by a file and has no --kind; a --kind that contradicts the miniature world."""
    key = (concept or "").strip().lower()
    if model == "toy":
        if concept_file:
            die("--concept_file describes an SD concept; the miniature model's concepts come from assets/world.json, "
                "so leave --concept_file out.")
        world = json.loads(WORLD_FILE.read_text())
        for world_kind, group in (("object", "objects"), ("colour", "colours")):
            if key in world[group] and key != world["anchors"][world_kind]:
                if kind is not None and kind != world_kind:
                    die(f"'{key}' is a{'n' if world_kind == 'object' else ''} {world_kind} of the miniature world, "
                        f"not a{'n' if kind == 'object' else ''} {kind}; leave --kind out.")
                entry = world[group][key]
                templates = ["{}", "a {}", "a picture of a {}"] if world_kind == "object" else ["{}", "a {} thing", "a drawing of a {} thing"]
                others = [c for c in world[group] if c not in (key, world["anchors"][world_kind])]
                return dict(kind=world_kind, name=key, words=entry["words"], held_out=entry["held_out"],
                            near=entry["near"], anchor=world["anchors"][world_kind], anchors={}, others=others,
                            templates=templates, related=None, unrelated=None, preserve=None)
        names = [c for g in ("objects", "colours") for c in world[g] if c not in world["anchors"].values()]
        die(f"unknown concept '{concept}' for the miniature model; choose one of: {', '.join(names)}.")
    builtins = builtin_concepts()
    if concept_file:
        info = read_concept_file(concept_file)
    elif key in builtins:
        info = builtins[key]
    elif kind is None:
        die(f"'{concept}' is not a built-in concept ({', '.join(builtins)}); say what kind of concept it is with "
            f"--kind {' / --kind '.join(KINDS)}, or describe it in a --concept_file (docs/concepts.md).")
    else:
        info = dict(name=key, kind=kind, words=[concept.strip()], held_out=[], near=[], others=None,
                    anchor=KIND_ANCHORS[kind], anchors={}, templates=list(KIND_TEMPLATES[kind]), related=None,
                    unrelated=None, preserve=None)
    if kind is not None and kind != info["kind"]:  # the flag beats the file (its anchor and templates stay)
        info = dict(info, kind=kind)
    if key:
        info["name"] = key
    if info["others"] is None:
        info["others"] = [c for c in builtins if c != info["name"]]
    return info


def concept_set(args) -> list[dict]:
    """The concepts one run erases, each as concept_info resolves it: one for a single --concept (exactly
    concept_info's answer), several for a repeated --concept or a concept file holding a list (docs/concepts.md).
    `args` has concept (a text, a list of texts, or None), model, kind and concept_file (parse_args has named
    the file's concepts). With several, --kind applies to every concept, and each concept's `near` and `others`
    leave out the set's other members: they are erased too, so no retention term or far-specificity prompt may
    ask to keep them. Raises (common.die) as concept_info does."""
    kind, concept_file = getattr(args, "kind", None), getattr(args, "concept_file", None)
    if not isinstance(args.concept, list):
        return [concept_info(args.concept, args.model, kind, concept_file)]
    if concept_file:  # a list file: each entry as if it were a file of its own
        entries = read_concept_files(concept_file)
        infos = []
        for entry in entries:
            info = dict(entry, kind=kind or entry["kind"])
            info["others"] = info["others"] if info["others"] is not None else list(builtin_concepts())
            infos.append(info)
    else:
        infos = [concept_info(name, args.model, kind) for name in args.concept]
    names = [info["name"] for info in infos]
    return [dict(info, near=[c for c in info["near"] if c not in names],
                 others=[c for c in info["others"] if c not in names]) for info in infos]


def set_name(infos: list[dict]) -> str:
    """A folder-safe name for a set of concepts: 'van_gogh+claude_monet'; past 60 characters, the first concept's
    name and how many more ('van_gogh+99_more'). One concept: its name, as the single-concept runs write it."""
    names = [info["name"].replace(" ", "_") for info in infos]
    joined = "+".join(names)
    return joined if len(joined) <= 60 or len(names) == 1 else f"{names[0]}+{len(names) - 1}_more"


def several_concepts(infos: list[dict], args, per_concept: tuple[str, ...] = ("words",)):
    """Refuse (common.die) the flags that describe one concept's lists (`per_concept`, e.g. --words) when a run
    erases several concepts: which concept they belong to would be a guess. Each concept's own lists come from
    its concept file or table instead."""
    if len(infos) > 1:
        for name in per_concept:
            if getattr(args, name, None):
                die(f"--{name} describes one concept, and this run erases {len(infos)}; leave --{name} out and give "
                    f"each concept its own in a concept file (a JSON list of concepts, docs/concepts.md).")


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------
def tokenize(pipe, prompts: list[str]) -> torch.Tensor:
    tok = pipe.tokenizer
    return tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids.to(pipe.device)


def encode(pipe, prompts: list[str], text_encoder=None) -> torch.Tensor:
    """Per-token hidden states [B, L, D], the U-Net's context (differentiable if the encoder is)."""
    return (text_encoder or pipe.text_encoder)(tokenize(pipe, prompts))[0]


def text_forward(text_encoder, token_embeds: torch.Tensor) -> torch.Tensor:
    """The CLIP text transformer on token embeddings [B, L, D] instead of ids (for soft prompts):
    adds position embeddings, runs the layers with the causal mask, applies the final layer norm."""
    tm = getattr(text_encoder, "text_model", text_encoder)  # transformers 5 dropped the wrapper
    hidden = tm.embeddings(inputs_embeds=token_embeds)
    n = hidden.shape[1]
    causal = torch.full((n, n), torch.finfo(hidden.dtype).min, device=hidden.device).triu(1)[None, None]
    hidden = tm.encoder(inputs_embeds=hidden, attention_mask=causal.to(hidden.dtype)).last_hidden_state
    return tm.final_layer_norm(hidden)


def eos_index(pipe, ids: torch.Tensor) -> torch.Tensor:
    """Position of the first end-of-text token in each row (CLIP's pooled position)."""
    return (ids == pipe.tokenizer.eos_token_id).int().argmax(-1)


def pool(hidden: torch.Tensor, eos: torch.Tensor, pooling: str = "eot", text_encoder=None) -> torch.Tensor:
    """The pooled text feature [B, D'] of hidden states [B, L, D] whose first end-of-text token is at `eos` [B]:
    'eot' the hidden state there (CLIP's pooled position, as its `pooler_output`), 'mean' the mean over
    positions 0..eos (start token, words, end token). Then `text_encoder`'s `text_projection` where it has one
    (CLIPTextModelWithProjection; SD v1.x's CLIPTextModel has none, so there D' = D)."""
    if pooling == "eot":
        feature = hidden[torch.arange(len(hidden), device=hidden.device), eos]
    elif pooling == "mean":
        upto = torch.arange(hidden.shape[1], device=hidden.device)[None] <= eos[:, None]  # [B, L]
        feature = (hidden * upto[..., None]).sum(1) / upto.sum(1, keepdim=True)
    else:
        die(f"pooling must be 'eot' or 'mean', not '{pooling}'.")
    projection = getattr(text_encoder, "text_projection", None)
    return projection(feature) if projection is not None else feature


def pooled_features(pipe, prompts: list[str], text_encoder=None, pooling: str = "eot") -> torch.Tensor:
    """pool(E(prompts)) [B, D']: the pooled feature (see `pool`) of each prompt under `text_encoder` (default
    the pipeline's); differentiable if the encoder is."""
    encoder = text_encoder or pipe.text_encoder
    ids = tokenize(pipe, prompts)
    return pool(encoder(ids)[0], eos_index(pipe, ids), pooling, encoder)


# ---------------------------------------------------------------------------------------------
# Sampling (DDIM, eta = 0, classifier-free guidance)
# ---------------------------------------------------------------------------------------------
def predict_noise(unet, latents, t, cond, uncond=None, guidance: float = 1.0) -> torch.Tensor:
    """eps = eps(uncond) + guidance * (eps(cond) - eps(uncond)); conditional only if uncond is None."""
    if uncond is None:
        return unet(latents, t, encoder_hidden_states=cond).sample
    eps_uncond, eps_cond = unet(torch.cat([latents, latents]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
    return eps_uncond + guidance * (eps_cond - eps_uncond)


def initial_latents(pipe, seeds: list[int]) -> torch.Tensor:
    size = pipe.unet.config.sample_size
    shape = (pipe.unet.config.in_channels, size, size)
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(pipe.device)  # float32; autocast(pipe) runs half-precision models on it


def ddim_timesteps(pipe, steps: int) -> torch.Tensor:
    pipe.scheduler.set_timesteps(steps)
    return pipe.scheduler.timesteps.clone()


def denoise(pipe, latents, cond, uncond, steps: int, guidance: float, start: int = 0, stop: int | None = None, unet=None):
    """Run DDIM steps [start, stop) of a `steps`-step schedule from `latents`."""
    for t in ddim_timesteps(pipe, steps)[start:stop]:
        eps = predict_noise(unet or pipe.unet, latents, t, cond, uncond, guidance)
        latents = pipe.scheduler.step(eps, t, latents).prev_sample
    return latents


def sample_until(pipe, cond, uncond, seeds: list[int], steps: int, stop: int, guidance: float, unet=None):
    """x_t after the first `stop` of `steps` DDIM steps (ESD's "generate until t"), and the DDPM
    timestep that x_t is at (the timestep the U-Net should be queried with)."""
    latents = denoise(pipe, initial_latents(pipe, seeds), cond, uncond, steps, guidance, 0, stop, unet)
    return latents, int(ddim_timesteps(pipe, steps)[stop])


def decode(pipe, latents, batch_size: int | None = None) -> list[Image.Image]:
    """PIL images of latents [B, 4, h, w], decoded `batch_size` at a time (default: 4 on the miniature model,
    1 at SD size, as diffusers' VAE slicing: at 512 x 512 the decoder's activations take ~1.5 GB per image in
    fp32, so 32 at once would not fit a 24 GB card)."""
    batch_size = batch_size or (4 if pipe.base_model == "toy" else 1)
    out = []
    for i in range(0, len(latents), batch_size):
        chunk = latents[i:i + batch_size].to(pipe.vae.dtype)
        images = pipe.vae.decode(chunk / pipe.vae.config.scaling_factor).sample
        images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        out += [Image.fromarray(im) for im in images]
    return out


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], steps: int | None = None, guidance: float | None = None,
             unet=None, text_encoder=None, embeds=None, batch_size: int = 32, progress: bool = True, desc: str = "generate"):
    """Images for prompts (or for precomputed context `embeds` [B, L, D]), one seed each."""
    steps = steps or sampling_defaults(pipe)["steps"]
    guidance = sampling_defaults(pipe)["guidance"] if guidance is None else guidance
    batch_size = batch_size if pipe.base_model == "toy" else min(batch_size, SD_GENERATE_BATCH)
    with autocast(pipe):
        uncond_one = encode(pipe, [""], text_encoder)
    images = []
    for i in tqdm(range(0, len(seeds), batch_size), desc=desc, disable=not progress, leave=False):
        n = len(seeds[i:i + batch_size])
        with autocast(pipe):
            cond = embeds[i:i + n] if embeds is not None else encode(pipe, prompts[i:i + n], text_encoder)
            latents = denoise(pipe, initial_latents(pipe, seeds[i:i + n]), cond, uncond_one.expand(n, -1, -1),
                              steps, guidance, unet=unet)
        images += decode(pipe, latents.float())
    return images


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------
def attn2_projections(unet, kinds=("to_k", "to_v")) -> list[tuple[str, torch.nn.Linear]]:
    """The cross-attention (attn2) projections of the U-Net, by full module name."""
    return [(name, module) for name, module in unet.named_modules()
            if ".attn2." in f".{name}" and name.split(".")[-1] in kinds and isinstance(module, torch.nn.Linear)]


def set_trainable(module: torch.nn.Module, predicate) -> list[str]:
    """Freeze every parameter, then unfreeze those whose name satisfies predicate(name)."""
    names = []
    for name, param in module.named_parameters():
        param.requires_grad_(bool(predicate(name)))
        if param.requires_grad:
            names.append(name)
    return names


def trainable_copy(module: torch.nn.Module, predicate) -> torch.nn.Module:
    clone = copy.deepcopy(module)
    if not set_trainable(clone, predicate):
        die("no parameter matches the training selection.")
    return clone.train()


def rowwise_backward(loss_of_rows, x: torch.Tensor, chunk: int):
    """Value and gradient of a loss that is a *sum over the rows* of x [B, ...], computed `chunk` rows at a
    time so that only one chunk's graph is in memory (e.g. rows through the U-Net at 512 x 512).
    `loss_of_rows(x_rows, rows)` gets a slice of x (a leaf that requires grad) and the slice object.
    Returns (loss, d loss / d x), both detached; callers push the gradient on with
    `(x * grad).sum().backward()` (or x.backward(grad)). Same value and gradient as one pass, up to
    float summation order (tests/test_common.py checks it against autograd on the whole batch)."""
    leaf, total = x.detach().requires_grad_(True), torch.zeros((), device=x.device)
    for i in range(0, len(x), chunk):
        part = loss_of_rows(leaf[i:i + chunk], slice(i, i + chunk))
        part.backward()
        total = total + part.detach().float()
    return total, leaf.grad if leaf.grad is not None else torch.zeros_like(x)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_mb(device) -> float:
    """Peak GPU memory allocated by torch on CUDA; otherwise the process's peak resident memory."""
    if str(device).startswith("cuda"):
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    try:  # Linux: this process's own high-water mark (ru_maxrss would inherit a parent's across fork + exec)
        status = Path("/proc/self/status").read_text()
        return round(int(status.split("VmHWM:")[1].split()[0]) / 1024, 1)
    except (OSError, IndexError, ValueError):
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# ---------------------------------------------------------------------------------------------
# Memory and cost: half-precision frozen parts, per-phase peak memory, seconds per iteration
# ---------------------------------------------------------------------------------------------
HALF = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def set_mixed_precision(pipe, mixed_precision: str):
    """--mixed_precision as diffusers' training examples do it: the *frozen* components (pipe.vae,
    pipe.text_encoder, pipe.unet) are cast to fp16/bf16, while trained copies (made before this call) keep
    fp32 weights and optimizer state; forward passes run under `autocast(pipe)`. Returns a GradScaler,
    enabled for fp16 on CUDA only (bf16 needs none; on a CPU fp16 kernels are ~200x slower than bf16).
    Raises SystemExit for an unknown value."""
    if mixed_precision not in HALF:
        die(f"--mixed_precision must be one of {', '.join(HALF)}, not '{mixed_precision}'.")
    pipe.mixed_precision = mixed_precision
    if HALF[mixed_precision] is not None:
        for part in (pipe.vae, pipe.text_encoder, pipe.unet):
            part.to(HALF[mixed_precision])
    return torch.amp.GradScaler(pipe.device.type, enabled=mixed_precision == "fp16" and pipe.device.type == "cuda")


def autocast(pipe):
    """torch.autocast in the pipeline's --mixed_precision dtype (a no-op at full precision)."""
    dtype = HALF[getattr(pipe, "mixed_precision", "no")]
    return torch.autocast(pipe.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def release(*optimizers):
    """Drop the gradients and optimizer state (Adam's two moments) once training is over, before samples.png
    is drawn: at SD size ESD-u's take 10 GB."""
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
        optimizer.state.clear()


def reset_peak_memory(device):
    """Start a new peak: torch's counter on CUDA, the process's VmHWM on Linux (/proc/self/clear_refs)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


@contextlib.contextmanager
def phase(profile: dict, name: str, device):
    """Record the peak memory (MB, `peak_memory_mb`) and seconds of the enclosed block as profile[name]."""
    reset_peak_memory(device)
    start = time.perf_counter()
    yield
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    profile[name] = dict(peak_memory_mb=peak_memory_mb(device), seconds=round(time.perf_counter() - start, 2))


def profile_peak(profile: dict) -> float:
    """The highest peak memory (MB) over a profile's phases."""
    return max(v["peak_memory_mb"] for v in profile.values() if isinstance(v, dict))


def timed(iterable, profile: dict, device):
    """Yield from `iterable`, appending each iteration's wall-clock seconds to profile['iteration_seconds']."""
    times = profile.setdefault("iteration_seconds", [])
    for item in iterable:
        start = time.perf_counter()
        yield item
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        times.append(round(time.perf_counter() - start, 3))


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------
def image_grid(rows: list[list[Image.Image]], labels: list[str] | None = None, scale: int = 1) -> Image.Image:
    """Rows of equally sized images, with an optional label left of each row."""
    w, h = rows[0][0].size
    w, h = w * scale, h * scale
    pad = 8 * max(len(s) for s in labels) + 6 if labels else 0
    grid = Image.new("RGB", (pad + w * max(map(len, rows)), h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            grid.paste(im.resize((w, h), Image.NEAREST), (pad + c * w, r * h))
        if labels:
            draw.text((3, r * h + h // 2 - 5), labels[r], fill="black")
    return grid


def before_after(pipe, prompts: list[str], seeds: list[int], unet=None, text_encoder=None) -> Image.Image:
    """Original row above erased row, same prompts and seeds."""
    scale = max(1, 96 // pipe.unet.config.sample_size // 4)
    rows = [generate(pipe, prompts, seeds, progress=False),
            generate(pipe, prompts, seeds, unet=unet, text_encoder=text_encoder, progress=False)]
    return image_grid(rows, ["original", "erased"], scale=scale)


# ---------------------------------------------------------------------------------------------
# The erased-model format
# ---------------------------------------------------------------------------------------------
def changed_tensors(prefix: str, trained: torch.nn.Module, original: torch.nn.Module) -> dict:
    """Parameters of `trained` that differ from `original`, keyed '<prefix>.<name>'. Where --mixed_precision
    has cast `original` to half precision, a trained (requires_grad) parameter counts as changed (an update
    below half precision's resolution is still a change) and any other is compared after the same cast."""
    reference = dict(original.named_parameters())

    def changed(p, ref):
        if p.dtype == ref.dtype:
            return not torch.equal(p.detach(), ref)
        return p.requires_grad or not torch.equal(p.detach().to(ref.dtype), ref)

    return {f"{prefix}.{name}": p.detach().cpu().contiguous() for name, p in trained.named_parameters()
            if changed(p, reference[name].detach())}


def atomic_save_dir(out: Path, write) -> Path:
    """Call write(tmp_dir), then move tmp_dir to `out` in one rename (replacing an older `out`)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def check_output(out_dir, base_model: str):
    """An erased model may be written to `out_dir`: not into a pipeline (the base's or any other), and not over a
    folder that holds something else than an erased model."""
    out = Path(out_dir).resolve()
    if (out / "model_index.json").exists() or out == TOY_DIR or TOY_DIR in out.parents or (
            base_model and Path(base_model).exists() and Path(base_model).resolve() in [out, *out.parents]):
        die(f"refusing to write into the base model's folder {out}; choose another --output.")
    if out.exists() and (not out.is_dir() or any(out.iterdir()) and not (out / "erased.safetensors").exists()):
        die(f"{out} exists and is not an erased model; choose another --output.")


# Fingerprints are recorded in these precisions, so that a base loaded in float16 or bfloat16 still matches.
FINGERPRINT_DTYPES = ("float32", "float16", "bfloat16")
FINGERPRINT_COVERS = ("the shape of every U-Net and text-encoder parameter, the tokenizer's vocabulary, and the "
                      "base's own values of every tensor in erased.safetensors")


def named_part(pipe, key: str):
    """The pipeline's parameter for an erased-model key 'unet.<name>' or 'text_encoder.<name>'."""
    part, name = key.split(".", 1)
    return {"unet": pipe.unet, "text_encoder": pipe.text_encoder}[part].get_parameter(name)


def base_fingerprint(pipe, keys, dtypes=None, originals: dict | None = None) -> dict:
    """sha256 of what an erased model needs from its base (FINGERPRINT_COVERS), one per precision {dtype: hex}:
    the values are cast to that precision before hashing. By default every precision of FINGERPRINT_DTYPES that
    the loaded values can be cast down to (a float32 base: all three; a float16 base: float16 alone).
    `originals` {key: tensor} stands in for `pipe`'s values where a start model (--start_from) has replaced the
    base's own; the precision is still the one `pipe` holds them in."""
    params = {key: named_part(pipe, key) for key in sorted(keys)}
    loaded = str(next(iter(params.values())).dtype).removeprefix("torch.")
    values = {key: (originals or {}).get(key, param) for key, param in params.items()}
    dtypes = dtypes or (FINGERPRINT_DTYPES if loaded == "float32" else (loaded,))
    shared = hashlib.sha256()
    for part in (pipe.unet, pipe.text_encoder):
        shared.update(repr(sorted(tuple(p.shape) for p in part.parameters())).encode())
    shared.update(repr(sorted(pipe.tokenizer.get_vocab().items())).encode())
    digests = {}
    for dtype in dtypes:
        digest = shared.copy()
        for key, param in values.items():
            value = param.detach().to("cpu", getattr(torch, dtype)).contiguous()
            digest.update(f"{key}{list(value.shape)}".encode())
            digest.update(value.reshape(-1).view(torch.uint8).numpy())
        digests[dtype] = digest.hexdigest()
    return digests


def save_erased(out_dir, tensors: dict, method: str, args, base, seconds: float, samples=None, extra=None,
                write_extra=None):
    """Write an erased model atomically; refuse to write into a pipeline or over foreign files. `base` is the
    base pipeline (its name and fingerprint go into config.json), or only its name (no fingerprint is recorded).
    `extra` adds keys to config.json; `write_extra(tmp_dir)` adds files (e.g. a cache) in the same rename.
    config.json records the concept as common.concept_info resolved it from args (its kind, words, anchor, ...);
    for several concepts erased together, "concept" is null and "concepts" lists each (common.concept_set).
    When `base` was loaded with start_from (a sequential run), the tensors written are the start model's with these
    replacing the ones they share (merge_start), the fingerprint is of the base's own values, and config.json adds
    "start_from" (the start model's path, method and concept(s)) and "erased_concepts" (every concept, in order)."""
    from safetensors.torch import save_file

    base_model = base if isinstance(base, str) else base.base_model
    check_output(out_dir, base_model)
    out = Path(out_dir).resolve()
    if not tensors:
        die("the method changed no tensor; nothing to save.")
    import diffusers
    import transformers

    start = None if isinstance(base, str) else getattr(base, "start_from", None)
    if start is not None:  # a sequential run: the start model's tensors, then this run's (they win)
        tensors, started = merge_start(start, tensors)
    originals = start["base_values"] if start else None
    fingerprint = None if isinstance(base, str) else {"sha256": base_fingerprint(base, tensors, originals=originals),
                                                      "covers": FINGERPRINT_COVERS}
    named = getattr(args, "concept", None) or getattr(args, "concept_file", None)
    several = named and isinstance(args.concept, list)
    concept = concept_info(args.concept, base_model, getattr(args, "kind", None), getattr(args, "concept_file", None)) \
        if named and hasattr(args, "model") and not several else None  # as the method saw it: kind, words, anchor, ...
    concepts = {"concepts": concept_set(args)} if several else {}  # a set erased together: each concept resolved
    config = {"format": FORMAT, "method": method, "base_model": base_model, "base_fingerprint": fingerprint,
              "seconds": round(seconds, 2), "concept": concept, **concepts,
              "args": dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(args),
              "changed_tensors": len(tensors), "versions": {
                  "python": platform.python_version(), "torch": torch.__version__,
                  "diffusers": diffusers.__version__, "transformers": transformers.__version__}, **(extra or {})}
    if start is not None:
        config.update(start_from=started, erased_concepts=list(dict.fromkeys(
            erased_concepts(start["config"]) + erased_concepts(config))))  # a concept erased again is listed once

    def write(tmp):
        save_file(tensors, tmp / "erased.safetensors")
        (tmp / "config.json").write_text(json.dumps(config, indent=1, default=str))
        if samples is not None:
            samples.save(tmp / "samples.png")
        if write_extra is not None:
            write_extra(tmp)

    return atomic_save_dir(out, write)


def merge_start(start: dict, tensors: dict) -> tuple[dict, dict]:
    """A sequential run's tensors (--start_from): the start model's erased.safetensors, with this run's `tensors`
    replacing the ones they share. This run's tensors were compared with the start model (changed_tensors), so a
    start tensor it left alone is kept as it was, bit for bit. `start` is load_pipeline's pipe.start_from. Returns
    the merged {key: tensor} and what config.json records under "start_from" (the start's folder, method, concept(s)
    and its own start_from, how many of its tensors were kept and replaced)."""
    from safetensors.torch import load_file

    folder = start["folder"]
    earlier = load_file(folder / "erased.safetensors")
    if set(earlier) != set(start["base_values"]):
        die(f"{folder}/erased.safetensors changed during this run; run again from a start model that stays put.")
    config = start["config"]
    merged = {**earlier, **tensors}
    return merged, dict(path=str(folder), method=config.get("method"), concept=config.get("concept"),
                        concepts=config.get("concepts"), start_from=config.get("start_from"),
                        kept_tensors=len(set(earlier) - set(tensors)),
                        replaced_tensors=len(set(earlier) & set(tensors)))


def erased_concepts(config: dict) -> list[str]:
    """The names of every concept an erased model's config.json says it erased: its concept or concepts, after
    those of the models it started from (--start_from), in the order they were erased."""
    if "erased_concepts" in config:
        return list(dict.fromkeys(config["erased_concepts"]))
    infos = config.get("concepts") or ([config["concept"]] if config.get("concept") else [])
    return [i["name"] for i in infos if isinstance(i, dict) and "name" in i]


def erased_output(method: str, infos: list[dict], args) -> Path:
    """Where a method writes its erased model: --output, else outputs/<method>-<concepts> (set_name), and for a
    sequential run outputs/<method>-<concepts>-after-<the start model's folder name> (so that it does not take the
    place of the one-run model of the same concepts)."""
    start = getattr(args, "start_from", None)
    after = f"-after-{Path(start).resolve().name}" if start else ""
    default = Path(f"outputs/{method}-{set_name(infos)}{after}")
    out = Path(args.output) if args.output else default
    if start and out.resolve() == Path(start).resolve():
        die(f"--output {out} is the --start_from model, which a sequential run must not replace; leave --output out "
            f"(it then writes {default}) or name a new folder.")
    if start:  # erasing again what the start model erased is allowed (e.g. to erase it harder), but said
        again = [i["name"] for i in infos if i["name"] in erased_concepts(read_erased_config(start))]
        if again:
            print(f"note: {start} already erased {', '.join(again)}; this run erases "
                  f"{'it' if len(again) == 1 else 'them'} again on top (config.json lists each concept once).",
                  file=sys.stderr)
    return out


def read_erased_config(folder) -> dict:
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
        assert config.get("format") == FORMAT and isinstance(config.get("base_model"), str)
        assert (folder / "erased.safetensors").exists()
    except Exception:
        die(f"{folder} is not an erased model (expected erased.safetensors and config.json from a method script).")
    return config


def same_model_name(a: str, b: str) -> bool:
    """The pre-fingerprint check: the same --model string, or two spellings of one local folder."""
    return a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())


def check_erased(pipe, folder) -> dict:
    """Check, before any tensor changes, that an erased model fits `pipe`, and return its config. Every key of
    erased.safetensors must be 'unet.<name>' or 'text_encoder.<name>' naming a parameter of that part, with
    exactly its shape and a floating dtype; and the base fingerprint in config.json must equal `pipe`'s, so the
    same weights are accepted under any --model spelling and other weights are refused. A folder written before
    fingerprints falls back to comparing the --model names, with a one-line notice."""
    from safetensors import safe_open

    config = read_erased_config(folder)
    file = Path(folder) / "erased.safetensors"
    erased_from, here = config["base_model"], pipe.base_model
    try:
        with safe_open(file, framework="pt") as f:
            header = {key: (f.get_slice(key).get_shape(), f.get_slice(key).get_dtype()) for key in f.keys()}
    except Exception as exc:
        die(f"{file} cannot be read ({type(exc).__name__}); write the erased model again.")
    if not header:
        die(f"{file} holds no tensor; write the erased model again.")
    params = {part: dict(getattr(pipe, part).named_parameters()) for part in ("unet", "text_encoder")}
    for key, (shape, dtype) in header.items():
        part, _, name = key.partition(".")
        if part not in params or not name:
            die(f"{file} holds the tensor '{key}', whose name does not start with 'unet.' or 'text_encoder.'; "
                f"it was not written by a method script of this repository.")
        if name not in params[part]:
            die(f"{file} holds '{key}', which names no parameter of the {part} of '{here}' (it was erased from "
                f"'{erased_from}').")
        if dtype not in ("F64", "F32", "F16", "BF16"):
            die(f"{file} holds '{key}' as {dtype}; a weight must be floating point (F64, F32, F16 or BF16).")
        if list(shape) != list(params[part][name].shape):
            die(f"{file} holds '{key}' with shape {list(shape)}, but that weight of '{here}' has shape "
                f"{list(params[part][name].shape)} (it was erased from '{erased_from}').")

    recorded = (config.get("base_fingerprint") or {}).get("sha256") or {}
    loaded = str(named_part(pipe, next(iter(header))).dtype).removeprefix("torch.")
    usable = [d for d in recorded if d == loaded] or ([d for d in recorded if d in FINGERPRINT_DTYPES]
                                                      if loaded == "float32" else [])
    if not usable:
        why = "records no fingerprint of its base (it was written before fingerprints)" if not recorded else \
            f"records its base's fingerprint in {', '.join(recorded)}, not in the {loaded} this base is loaded in"
        print(f"note: {folder} {why}; only the --model names are compared.", file=sys.stderr)
        if not same_model_name(erased_from, here):
            die(f"{folder} was erased from '{erased_from}', not from '{here}'; pass --model {erased_from}.")
        return config
    if base_fingerprint(pipe, header, usable[:1])[usable[0]] != recorded[usable[0]]:
        if same_model_name(erased_from, here):  # same name, other weights: naming it twice would not help
            die(f"{folder} was erased from '{erased_from}' with other weights than '{here}' holds now (its fingerprint "
                f"differs): the model at that name has changed since; erase again from it, or pass --model with a "
                f"copy of the weights it was erased from.")
        die(f"{folder} was erased from '{erased_from}', and '{here}' holds other weights (its fingerprint differs); "
            f"pass --model {erased_from} or a copy of those same weights.")
    return config


def load_erased(pipe, folder, base_values: dict | None = None) -> dict:
    """Apply an erased model's tensors onto `pipe` once check_erased has accepted them all; returns its config.
    `base_values`, a dict, receives a CPU copy of `pipe`'s own value of every tensor before it is replaced."""
    from safetensors.torch import load_file

    config = check_erased(pipe, folder)
    tensors = load_file(Path(folder) / "erased.safetensors")
    broken = next((key for key, value in tensors.items() if not torch.isfinite(value).all()), None)
    if broken is not None:
        die(f"{folder}/erased.safetensors holds NaN or infinite values in '{broken}'; write the erased model again.")
    with torch.no_grad():
        for key, value in tensors.items():
            param = named_part(pipe, key)
            if base_values is not None:
                base_values[key] = param.detach().to("cpu", copy=True)
            param.copy_(value.to(param.device, param.dtype))
    return config


def export_pipeline(folder, out_dir, model: str | None = None) -> Path:
    """Write the erased model `folder`, applied onto its base (`model`, default: the base named in its
    config.json), as a whole diffusers pipeline folder (save_pretrained, safetensors, DDIM scheduler) that
    StableDiffusionPipeline.from_pretrained(out_dir) loads with no code from this repository. The erased model's
    config.json is copied in as erasure.json."""
    config = read_erased_config(folder)
    model = model or config["base_model"]
    out, base = Path(out_dir).resolve(), (TOY_DIR if model == "toy" else Path(model).resolve())
    if out.exists() and (not out.is_dir() or any(out.iterdir()) and not (out / "erasure.json").exists()):
        die(f"{out} exists and is not an export of an erased model; choose another --output.")
    for taken in (Path(folder).resolve(), base):
        if taken in [out, *out.parents] or out in taken.parents:
            die(f"refusing to write the export into or around {taken}; choose another --output.")
    pipe = load_pipeline(model, erased=folder, device="cpu")

    def write(tmp):
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "erasure.json").write_text(json.dumps(config, indent=1))

    return atomic_save_dir(out, write)


# ---------------------------------------------------------------------------------------------
# `python common.py`: draw images from the original model or an erased one
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SampleArgs:
    prompts: list[str] = dataclasses.field(default_factory=lambda: ["a red circle", "a blue square", "a green star"])
    """prompts to draw, one column each"""
    model: str = "toy"
    """'toy' (the miniature model), a hub id such as CompVis/stable-diffusion-v1-4, or a local path"""
    erased: str | None = None
    """an erased-model folder; its row is drawn under the original's, same seeds"""
    seeds: int = 4
    """seeds per prompt (rows)"""
    steps: int | None = None
    """DDIM steps (default: 25 toy, 50 SD)"""
    guidance: float | None = None
    """classifier-free guidance scale (default: 3 toy, 7.5 SD)"""
    output: str = "outputs/samples.png"
    """where the PNG grid is written"""


SAMPLE_LIMITS = dict(prompts="non-empty", erased="erased model", seeds="[1, 1000]", steps="[1, 1000]", guidance=">= 0",
                     output="non-empty")


@dataclasses.dataclass
class ExportArgs:
    erased: str
    """erased-model folder written by a method script"""
    output: str
    """new folder for the whole diffusers pipeline (StableDiffusionPipeline.from_pretrained loads it alone)"""
    model: str | None = None
    """the base the concept was erased from: 'toy', a hub id or a local copy of the same weights (default: the
    base_model named in the erased model's config.json)"""


def export_main(argv):
    args = parse_args(ExportArgs, argv, limits=dict(erased="erased model", output="non-empty"))
    out = export_pipeline(args.erased, args.output, args.model)
    print(f"wrote {out}: StableDiffusionPipeline.from_pretrained('{out}') loads it")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["export"]:  # python common.py export --erased DIR --output OUT [--model BASE]
        return export_main(argv[1:])
    args = parse_args(SampleArgs, argv, limits=SAMPLE_LIMITS)
    if not args.prompts:
        die("--prompts needs at least one prompt.")
    output = Path(args.output)
    if output.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp") or output.is_dir():
        die(f"--output {args.output} must be an image file name ending in .png, .jpg or .webp.")
    if any(p.exists() and not p.is_dir() for p in output.parents):
        die(f"--output {args.output}: a part of its folder path is a file.")
    pipe = load_pipeline(args.model)
    if args.erased:
        check_erased(pipe, args.erased)  # before the original's row is drawn
    seeds = [s for s in range(args.seeds) for _ in args.prompts]
    prompts = args.prompts * args.seeds
    rows, labels = [], []
    for tag, erased in [("original", None), ("erased", args.erased)]:
        if tag == "erased" and erased is None:
            break
        if erased:
            load_erased(pipe, erased)
        images = generate(pipe, prompts, seeds, args.steps, args.guidance)
        rows += [images[i:i + len(args.prompts)] for i in range(0, len(images), len(args.prompts))]
        labels += [f"{tag} s{s}" for s in range(args.seeds)]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows, labels, scale=max(1, 128 // rows[0][0].size[0])).save(args.output)
    print(f"wrote {args.output}: columns {args.prompts}")


if __name__ == "__main__":
    main()
