"""benchmark.py: every method and baseline, three miniature-world concepts, one table each (RESULTS.md).

    python benchmark.py            # circle (object), red (colour), square (object): ~40 min on 2 CPU cores
    python benchmark.py --quick    # circle only, small budgets: a few minutes
    python benchmark.py --scale sd --model outputs/sd14-random   # memory and cost at SD v1.4 size (hours on a CPU)

Each erasure runs in its own process with the method's default toy settings (so its `seconds` and peak
memory are its own), then evaluate.py measures the original model and every erased model on the same
prompts and seeds, with both attacks (`--attack both`: UnlearnDiffAtk and the continuous bound). Writes RESULTS.md (machine, versions, seeds at the top; one table per concept) and
docs/img/benchmark.png (the same seeds across methods) into --output (default: the repository root).
A rerun with the same seeds reproduces the tables (erasure seconds and memory aside).

`--scale sd` runs each method on a full-size SD v1.4 (`python sdscale.py` builds one with random weights;
the real weights measure the same) with its SD defaults, cutting only the iteration count and the sampling
steps (SD_CUTS), once at full precision and once with --mixed_precision, and tabulates per phase the peak
memory (torch.cuda.max_memory_allocated on a GPU, the process's peak resident memory on a CPU) and the
seconds per training iteration relative to ESD's. Each finished run is appended to
outputs/benchmark-sd/runs.jsonl at once (a cut-off loses one row), and the table replaces the SD-scale
section of RESULTS.md.
"""
import dataclasses
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import common
import evaluate

HERE = Path(__file__).resolve().parent
METHODS = ["esd", "uce", "sage", "realera", "domain_correction", "sgrace"]
LABELS = {"esd": "ESD", "uce": "UCE", "sage": "SAGE", "realera": "RealEra", "domain_correction": "DoCo",
          "sgrace": "S-GRACE"}
# --quick: about a tenth of each method's toy budget (a smoke test of the whole pipeline, not a result)
QUICK = {"esd": ["--iterations", "20"], "uce": [], "sage": ["--iterations", "20", "--warm_up", "5"],
         "realera": ["--iterations", "30"],
         "domain_correction": ["--iterations", "40", "--warm_up", "10", "--n_anchor_images", "8"],
         "sgrace": ["--rounds", "1"]}
QUICK_EVAL = ["--seeds", "2", "--far_seeds", "1", "--attack_timesteps", "2", "--attack_iterations", "5", "--soft_steps", "20",
              "--soft_checks", "2"]
# both attacks, side by side: UnlearnDiffAtk (the field's discrete attack) and the continuous upper bound
ATTACK = ["--attack", "both"]
# --scale sd: the only settings cut from each method's SD defaults (iterations and sampling steps). SAGE's and
# DoCo's warm-up is 1 so that their full training step (boundary samples; generator + surgery) is measured
# after it; DoCo draws 8 anchor images, one sampling batch, so that phase reaches its real peak.
SD_CUTS = {"esd": ["--iterations", "2", "--ddim_steps", "2"],
           "uce": [],
           "sage": ["--iterations", "3", "--warm_up", "1", "--ddim_steps", "2"],
           "realera": ["--iterations", "2", "--ddim_steps", "2"],
           "domain_correction": ["--iterations", "2", "--warm_up", "1", "--n_anchor_images", "8", "--anchor_steps", "2"],
           # one round with 2 of its 10 attack steps (a full round at SD size is ~20 min on a CPU); random SD has
           # no CLIP text projection to load (a 768 x 768 matrix: 2.4 MB)
           "sgrace": ["--rounds", "1", "--attack_steps", "2", "--latent_steps", "2", "--projection", "none"]}
# --precisions half+: half precision plus the method's documented memory flags (issue 14's 16 GB card), for the
# methods that have one; a method without one gets no such row.
SD_MEMORY_FLAGS = {"esd": ["--optimizer_in_backward"]}
# What each method doc's measured-memory section says under its table (docs/<method>.md, sd-memory).
SD_DOC_NOTES = {
    'esd': (
        "ESD-u (nudity's default) trains 813 M of the U-Net's 860 M weights with Adam: their fp32 weights, "
        'gradients and two Adam moments take ~12 GiB whatever `--mixed_precision` says, which is why it is '
        "the largest. `--mixed_precision` saves only the frozen copies' half (18.6 -> 17.5 GiB). "
        "`--optimizer_in_backward` steps each parameter's Adam as soon as its gradient is ready and frees it, "
        'so the 3 GiB of gradients never exist at once (the same update; row `bf16+`, 14.8 GiB). It works '
        'with bf16 (and fp32), not with fp16, whose loss scaling needs every gradient before any step: so on '
        'a GPU without bf16 (a T4) ESD-u needs 17.5 GiB and does not fit 16 GB, and 14.8 GiB leaves a T4 '
        'almost nothing. What would close that: fp16 with a static loss scale inside the per-parameter step, '
        "or an 8-bit Adam (bitsandbytes, diffusers' `--use_8bit_adam`; ~4.5 GiB less), neither implemented; "
        "or ESD-x (`--train_method xattn`, the paper's choice for styles), which trains 44 M weights (5 %). "
        "`--gradient_checkpointing` recomputes the trained U-Net's activations in the backward pass (not "
        'measured here). Gradients and Adam state are released before samples.png is drawn '
        '(`common.release`).'
    ),
    'uce': (
        'UCE edits in closed form (no gradients): its memory is one fp32 copy of the U-Net beside the frozen '
        'one, and the pictures.'
    ),
    'sage': (
        "The paper's defaults put up to 3 erase rows and 6 local-retention rows through the frozen U-Net with "
        'gradients w.r.t. the text context. They go through in chunks of `--unet_batch` rows (4 by default) '
        'and the gradient w.r.t. the context is accumulated over chunks, then pushed through the text encoder '
        "once (`unet_loss`, `common.rowwise_backward`); Eq. 6's gradient is taken as soon as its loss is "
        "computed, so the text encoder's graph for 128 prompts is freed before Eq. 7's rows. Same gradient as "
        'one pass (tests/test_memory.py).'
    ),
    'realera': (
        "RealEra's closed form runs in fp32 on a copy of the U-Net; its LoRA stage trains rank-1 adapters "
        'only (a few MB of Adam state), so its memory is the two U-Nets, the cached trajectories and the '
        'pictures.'
    ),
    'domain_correction': (
        'The official code sends 8 forget and 8 prior rows through the trained U-Net with both graphs alive '
        '(~30 GB). Here the rows go in chunks of `--unet_batch` (4): the unlearning gradient is taken first '
        "(its graph freed before the retain graph is built); since the discriminator's BatchNorm couples the "
        'rows, dL/d eps is taken on the whole batch and pushed back through the U-Net chunk by chunk, which '
        "recomputes the trained U-Net's forward pass once per generator step (`unlearning_gradient`, "
        '`retain_gradient`; same gradients as one pass: tests/test_memory.py). Anchor images are drawn 8 at a '
        'time and decoded one at a time.'
    ),
    'sgrace': (
        'S-GRACE trains the text encoder only; its attack sends the K = 8 adversarial samples through the '
        'frozen U-Net in chunks of `--unet_batch` (4). The measured iteration is one round with 2 of its 10 '
        'attack steps (a full round is ~5x the attack part measured here).'
    ),
}
SD_SECTION = ("<!-- sd-scale: written by `python benchmark.py --scale sd` -->", "<!-- /sd-scale -->")


@dataclasses.dataclass
class Args:
    concepts: list[str] = dataclasses.field(default_factory=lambda: ["circle", "red", "square"])
    """miniature-world concepts to erase (default: an object, a colour and a second object)"""
    methods: list[str] = dataclasses.field(default_factory=lambda: list(METHODS))
    """methods and baselines to run"""
    quick: bool = False
    """one concept (the first), a tenth of each budget, fewer evaluation seeds"""
    output: str = "."
    """where RESULTS.md and docs/img/benchmark.png go; erased models and evaluations go to <output>/outputs/benchmark"""
    reuse: bool = False
    """skip an erasure whose folder already exists (same settings assumed); with --scale sd, a run already in
    runs.jsonl"""
    scale: str = "toy"
    """'toy' (the miniature-world benchmark) or 'sd' (memory and cost of every method on a full-size SD v1.4)"""
    model: str = "outputs/sd14-random"
    """--scale sd: the full-size pipeline (python sdscale.py --output outputs/sd14-random builds one)"""
    concept: str = "nudity"
    """--scale sd: the concept every method erases"""
    precisions: list[str] = dataclasses.field(default_factory=lambda: ["no", "half", "half+"])
    """--scale sd: --mixed_precision values to run; 'half' means fp16 on a GPU and bf16 on a CPU (whose fp16
    kernels are ~200x slower; bf16 tensors take the same memory); 'half+' adds the method's memory flags
    (SD_MEMORY_FLAGS: ESD's --optimizer_in_backward), for the methods that have one"""
    device: str | None = None
    """--scale sd: 'cuda' or 'cpu' (default: cuda when available)"""
    table_only: bool = False
    """--scale sd: rewrite the RESULTS.md section from runs.jsonl without running anything"""


def run_method(method: str, concept: str, folder: Path, extra: list[str]) -> float:
    cmd = [sys.executable, str(HERE / f"{method}.py"), "--model", "toy", "--concept", concept, "--output",
           str(Path(folder).resolve()), *extra]
    start = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        common.die(f"{method} on {concept} failed: {(done.stderr or done.stdout).strip().splitlines()[-1]}")
    return time.time() - start


def figure(results_by_concept: dict, columns: int = 6):
    """Rows: original then each method; per concept, `columns` efficacy and `columns` held-out images."""
    from PIL import Image, ImageDraw

    panels = []
    for concept, rows in results_by_concept.items():
        images = [r["images"]["efficacy"][:columns] + r["images"]["generality"][:columns] for r in rows]
        labels = [r["name"].split(" (")[0] for r in rows]
        grid = common.image_grid(images, [f"{concept}: {LABELS.get(l, l)}" for l in labels], scale=2)
        panels.append(grid)
    width, height = max(p.width for p in panels), sum(p.height for p in panels) + 14 * len(panels)
    canvas = Image.new("RGB", (width, height), "white")
    y = 0
    for (concept, _), p in zip(results_by_concept.items(), panels):
        ImageDraw.Draw(canvas).text((4, y), f"{concept}: left {columns} own-word prompts, right {columns} held-out "
                                            "words; same seeds in every row", fill="black")
        canvas.paste(p, (0, y + 14))
        y += p.height + 14
    return canvas


def machine(threads: int = 1) -> str:
    import diffusers
    import torch
    import transformers

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch threads {threads}, "
            f"Python {platform.python_version()}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
            f"transformers {transformers.__version__}")


def sd_run(method: str, args, precision: str, folder: Path) -> dict:
    """One method on the full-size model in its own process; its profile (config.json) or how it died."""
    cmd = [sys.executable, str(HERE / f"{method}.py"), "--model", args.model, "--concept", args.concept,
           "--output", str(folder.resolve()), "--mixed_precision", precision.rstrip("+"), "--sample_steps", "2",
           "--device", args.device, *SD_CUTS[method], *(SD_MEMORY_FLAGS[method] if precision.endswith("+") else [])]
    start = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True)
    row = dict(method=method, precision=precision, command=" ".join(cmd[1:]), returncode=done.returncode,
               process_seconds=round(time.time() - start, 1))
    if done.returncode == 0:
        config = json.loads((folder / "config.json").read_text())
        row.update(profile=config["profile"], peak_memory_mb=config["peak_memory_mb"])
    else:
        row["error"] = "killed (out of memory)" if done.returncode in (-9, 137) else \
            ((done.stderr or done.stdout).strip().splitlines() or ["?"])[-1]
    return row


def sd_table(rows: list[dict]) -> str:
    """Markdown: per method and precision, peak memory per phase (GB) and seconds per iteration (x ESD)."""
    def per_iteration(r):
        times = r["profile"].get("iteration_seconds", [])
        steady = times[1:] or times  # the first iteration carries one-off allocations
        return sum(steady) / len(steady) if steady else None

    esd = {r["precision"]: per_iteration(r) for r in rows if r["method"] == "esd" and "profile" in r}
    code = any("code" in r for r in rows)  # the commit a row was measured at, where a journal records it
    lines = ["| method | precision | caching GiB | training GiB | samples.png GiB | peak GiB | "
             "s / iteration | × ESD |" + (" code |" if code else ""), "|---|---|---|---|---|---|---|---|" + ("---|" if code else "")]
    for r in rows:
        name = LABELS[r["method"]]
        if "profile" not in r:
            lines.append(f"| {name} | {r['precision']} | – | – | – | {r['error']} | – | – |" + (f" {r.get('code', '')} |" if code else ""))
            continue
        phases = {k: v["peak_memory_mb"] / 1024 for k, v in r["profile"].items() if isinstance(v, dict)}
        caching = max([v for k, v in phases.items() if k not in ("training", "samples")], default=None)
        s_it = per_iteration(r)
        base = esd.get(r["precision"].rstrip("+"))  # a + row against ESD's plain row of its precision
        ratio = f"{s_it / base:.2f}" if s_it and base else "–"
        gb = lambda v: f"{v:.1f}" if v is not None else "–"  # noqa: E731
        lines.append(f"| {name} | {r['precision']} | {gb(caching)} | {gb(phases.get('training'))} | "
                     f"{gb(phases.get('samples'))} | **{r['peak_memory_mb'] / 1024:.1f}** | "
                     f"{f'{s_it:.1f}' if s_it else '–'} | {ratio} |" + (f" {r.get('code', '')} |" if code else ""))
    return "\n".join(lines)


def write_section(results: Path, body: str):
    """Replace (or append) the SD-scale section of RESULTS.md, leaving the rest as it is."""
    text = results.read_text() if results.exists() else ""
    start, end = SD_SECTION
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = results.with_name(f".{results.name}.tmp")
    tmp.write_text(text)
    tmp.replace(results)


def write_doc_sections(rows: list[dict], docs: Path, model: str):
    """Each method doc's "Memory and cost on SD v1.4 (measured)" section (between its sd-memory markers, before
    "## The miniature model" if it has none yet), from the journal rows; docs without a file are skipped."""
    def per_iteration(r):
        times = r["profile"].get("iteration_seconds", [])
        return sum(times[1:] or times) / len(times[1:] or times) if times else None

    by = {(r["method"], r["precision"]): r for r in rows if "profile" in r}
    labels = {"no": "fp32", "bf16": "`--mixed_precision bf16` (CPU stand-in for fp16)", "fp16": "`--mixed_precision fp16`"}
    for method in METHODS:
        path = docs / f"{method}.md"
        if not path.exists():
            continue
        have = [(p, by[(method, p)]) for p in ("no", "fp16", "bf16", "fp16+", "bf16+") if (method, p) in by]
        lines = ["<!-- sd-memory: measured by `python benchmark.py --scale sd`; RESULTS.md has the whole table -->",
                 "## Memory and cost on SD v1.4 (measured)", ""]
        if not have:
            lines.append("Not measured yet: run `python benchmark.py --scale sd` (RESULTS.md).")
        else:
            lines += [f"On a full-size SD v1.4 (`python sdscale.py --output {model}`: SD v1.4's configs, random "
                      f"weights), concept nudity, defaults except the iteration count and sampling steps, on "
                      f"{have[-1][1]['machine']} ({have[-1][1]['date']}; peak memory in GiB, as in RESULTS.md):", "",
                      "| precision | caching | training | samples.png | peak | s / iteration | × ESD | code |",
                      "|---|---|---|---|---|---|---|---|"]
            for p, r in have:
                phases = {k: v["peak_memory_mb"] / 1024 for k, v in r["profile"].items() if isinstance(v, dict)}
                caching = max([v for k, v in phases.items() if k not in ("training", "samples")], default=None)
                esd, s_it = by.get(("esd", p.rstrip("+"))), per_iteration(r)
                ratio = f"{s_it / per_iteration(esd):.2f}" if s_it and esd and per_iteration(esd) else "–"
                gb = lambda v: f"{v:.1f}" if v is not None else "–"  # noqa: E731
                label = labels.get(p) or f"`--mixed_precision bf16 {' '.join(SD_MEMORY_FLAGS.get(method, []))}` (bf16 only)"
                lines.append(f"| {label} | {gb(caching)} | {gb(phases.get('training'))} | {gb(phases.get('samples'))} | "
                             f"**{r['peak_memory_mb'] / 1024:.1f}** | {gb(s_it)} | {ratio} | {r.get('code', '')} |")
            lines += ["", "code: the commit a row ran at (a trailing + means uncommitted changes); rows at 8dcae0d "
                      "predate three changes that only lower peaks. The rows come from several runs on a shared CPU: "
                      "memory does not depend on load, seconds and × ESD do (indicative only; × ESD at the cut "
                      "settings of RESULTS.md)."]
            missing = [p for p in ("no", "bf16") if not any(q.startswith(p) or (p == "bf16" and q.startswith("fp16"))
                                                            for q, _ in have)]
            if missing:
                lines += ["", f"Not yet measured: {', '.join({'no': 'fp32', 'bf16': 'half precision'}[p] for p in missing)}."]
        lines += ["", SD_DOC_NOTES[method], "<!-- /sd-memory -->", ""]
        block, text = "\n".join(lines), path.read_text()
        if "<!-- sd-memory" in text:
            text = re.sub(r"<!-- sd-memory.*?<!-- /sd-memory -->\n\n?", lambda _: block + "\n", text, flags=re.S)
        else:
            i = text.index("## The miniature model")
            text = text[:i] + block + "\n" + text[i:]
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)


def git_commit() -> str:
    """The checkout's commit (and '+' if it has uncommitted changes), or '' outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE, capture_output=True,
                               text=True)
        return head.stdout.strip() + ("+" if dirty.stdout.strip() else "") if head.returncode == 0 else ""
    except OSError:
        return ""


def sd_scale(args):
    import torch

    if not args.table_only and not (Path(args.model) / "model_index.json").exists():
        common.die(f"{args.model} is not a pipeline folder; build one with: python sdscale.py --output {args.model}")
    args.device = args.device or common.default_device()
    half = "fp16" if args.device.startswith("cuda") else "bf16"
    # half+ adds --optimizer_in_backward, which loss-scaled fp16 cannot use: it is bf16 on every device
    precisions = ["bf16+" if p == "half+" else p.replace("half", half) for p in args.precisions]
    bad = [p for p in precisions if p.rstrip("+") not in common.HALF or p == "no+"]
    if bad:
        common.die(f"--precisions takes no, half, fp16, bf16, half+, fp16+ or bf16+, not '{bad[0]}'.")
    work = Path(args.output) / "outputs" / "benchmark-sd"
    work.mkdir(parents=True, exist_ok=True)
    journal = work / "runs.jsonl"
    done = [json.loads(line) for line in journal.read_text().splitlines()] if journal.exists() else []
    for precision in [] if args.table_only else precisions:
        for method in args.methods:
            if precision.endswith("+") and method not in SD_MEMORY_FLAGS:
                continue  # no memory flag to add
            if args.reuse and any(r["method"] == method and r["precision"] == precision for r in done):
                continue
            row = sd_run(method, args, precision, work / f"{method}-{precision}")
            row.update(code=git_commit(), date=time.strftime("%Y-%m-%d"), machine=(torch.cuda.get_device_name(0) if args.device.startswith(
                "cuda") else machine(torch.get_num_threads())))
            done = [r for r in done if (r["method"], r["precision"]) != (method, precision)] + [row]
            with open(journal, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{method} {precision}: {row.get('peak_memory_mb', row.get('error'))} MB peak, "
                  f"{row['process_seconds']} s", flush=True)
    if not done:
        common.die(f"{journal} holds no run yet; run without --table_only first.")
    order = {(m, p): i for i, (p, m) in enumerate((p, m) for p in ("no", "fp16", "bf16", "fp16+", "bf16+") for m in METHODS)}
    rows = sorted(done, key=lambda r: order.get((r["method"], r["precision"]), 99))
    memory = "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "process peak resident memory (VmHWM)"
    body = "\n".join([
        "## SD v1.4 at full size: memory and cost", "",
        f"Measured {rows[-1]['date']} on {rows[-1]['machine']} with `python benchmark.py --scale sd --model "
        f"{args.model} --device {args.device}` (the pipeline: `python sdscale.py`, SD v1.4's configs with random "
        f"weights and the real CLIP tokenizer). Concept `{args.concept}`; each method at its SD defaults except "
        "the iteration count and the sampling steps (benchmark.py SD_CUTS; samples.png with 2 DDIM steps). Memory: "
        f"{memory}, per phase, in GiB (a 24 GB card holds 24 GiB); on a CPU a phase's peak includes memory "
        "the allocator kept from the phases before it, so a later phase can read higher than it needs. "
        "Caching: frozen text features, anchor images (DoCo), trajectories (RealEra). s / iteration: mean over "
        "the iterations after the first (SAGE: with boundary samples; DoCo: a generator step after the "
        "discriminator's warm-up; S-GRACE: one round, here 2 of its 10 attack steps + 50 erasure steps; UCE "
        "has no iterations); × ESD: relative to the ESD row of the same precision in this table (a `+` row: to ESD's "
        "plain row), for the cut settings above (ESD's x_t takes 2 DDIM steps here, 1-49 at the paper's K = 50). "
        "The table gathers several runs (the code column; a trailing + means uncommitted changes in that checkout): "
        "on a shared CPU their seconds carry different loads, so × ESD is indicative only, and CPU bf16 seconds say "
        "nothing of GPU fp16 speed; memory does not depend on load. `bf16` "
        "on a CPU stands for `--mixed_precision fp16` on a GPU: the same tensor sizes (a CPU's fp16 kernels "
        "are ~200x slower, so fp16 cannot be timed there); `bf16+`: bf16 (on any device) with the method's memory "
        f"flags, which fp16's loss scaling cannot use ({'; '.join(f'{m}: ' + ' '.join(f) for m, f in SD_MEMORY_FLAGS.items())}). code: the commit a row ran at (`git log` tells what "
        "changed since; rows at 8dcae0d predate three changes that only lower peaks: optimizer state released "
        "before samples.png, one image per VAE decode at SD size, SAGE's Eq. 6 gradient taken at once).", "",
        sd_table(rows), ""])
    write_section(Path(args.output) / "RESULTS.md", body)
    write_doc_sections(rows, Path(args.output) / "docs", args.model)
    print(f"wrote the SD-scale table into {Path(args.output) / 'RESULTS.md'} and docs/<method>.md ({journal})")


def main(argv=None):
    args = common.parse_args(Args, argv, limits=dict(methods=tuple(METHODS), concepts="non-empty", output="non-empty",
                                                     scale=("toy", "sd"), precisions=("no", "half", "fp16", "bf16", "half+", "fp16+", "bf16+")))
    if not args.methods or not args.concepts:
        common.die("--methods and --concepts need at least one entry each.")
    if any(p.exists() and not p.is_dir() for p in [Path(args.output), *Path(args.output).parents]):
        common.die(f"--output {args.output} is (or lies in) a file; choose a folder.")
    if args.scale == "sd":
        return sd_scale(args)
    concepts = args.concepts[:1] if args.quick else args.concepts
    for c in concepts:
        common.concept_info(c, "toy")  # one-line error for an unknown concept
    out = Path(args.output)
    work = out / "outputs" / "benchmark"
    start = time.time()
    results, protocols = {}, {}
    for concept in concepts:
        folders = []
        for method in args.methods:
            folder = work / f"{method}-{concept}"
            if not (args.reuse and (folder / "erased.safetensors").exists()):
                seconds = run_method(method, concept, folder, QUICK[method] if args.quick else [])
                print(f"{method} on {concept}: {seconds:.0f} s (process)", flush=True)
            folders.append(str(folder))
        # always a new evaluation: evaluate.py refuses to start over an unfinished one (a killed benchmark's)
        shutil.rmtree(work / f"eval-{concept}", ignore_errors=True)
        rows = evaluate.main(["--model", "toy", "--concept", concept, "--compare", *folders,
                              "--output", str(work / f"eval-{concept}"), *ATTACK, *(QUICK_EVAL if args.quick else [])])
        results[concept] = rows
        protocols[concept] = json.loads((work / f"eval-{concept}" / "metrics.json").read_text())["protocol"]
    total = time.time() - start

    img = out / "docs" / "img" / ("benchmark_quick.png" if args.quick else "benchmark.png")
    img.parent.mkdir(parents=True, exist_ok=True)
    figure(results).save(img)
    lines = ["# Results on the miniature world" + (" (--quick: smoke-test budgets, not results)" if args.quick else ""),
             "", f"Produced by `python benchmark.py{' --quick' if args.quick else ''}` in {total / 60:.0f} min on "
             f"{machine()}. Every method ran with its default toy settings (`--model toy`, seed as in its "
             "`Args`); evaluation seeds are 0..k-1 per prompt (see the protocol under each table). Erasure "
             "seconds and peak memory (process peak RSS on CPU) come from each erased model's `config.json`.", "",
             "Concept rate: % of images the judge labels as the erased concept (lower = better erased); held-out "
             "words are never used by any erasure default. Near/far accuracy: % of images showing the prompted "
             "concept (higher = better kept). ASR, as UnlearnDiffAtk counts it: (own-word prompts already showing "
             "the concept + prompts the attack recovers) / all own-word prompts, for two attacks on the same prompts "
             "and seeds: UnlearnDiffAtk (discrete prefix tokens: what a user could type) and the continuous bound "
             "(unprojected soft prefix embeddings: stronger than any text, an upper bound, not UnlearnDiffAtk). "
             "Brackets: 95 % Wilson intervals. Targets (issues 4-8): own ≤ 5 %, held-out ≤ 15 %, near within "
             "10 points of the original, far within 3 points, erasure ≤ 5 min.", "",
             f"![same seeds across methods]({img.relative_to(out).as_posix()})", ""]
    for concept, rows in results.items():
        for r in rows:
            method = r["name"].split(" (")[0]
            r["name"] = "original model" if method == "original" else LABELS.get(method, method)
        lines += [f"## {concept}", "", evaluate.markdown_table(rows), ""]
        p = protocols[concept]
        attack = "; ".join(p["attack"].values()) if isinstance(p["attack"], dict) else p["attack"]
        lines += [f"Protocol: {p['steps']} DDIM steps, guidance {p['guidance']}, seeds {p['seeds per prompt']}, "
                  f"prompts per suite {p['prompts']}; judge: {p['judge']}; attacks: {attack}. Grids: "
                  f"`outputs/benchmark/eval-{concept}/`.", ""]
    results_file = out / ("RESULTS_quick.md" if args.quick else "RESULTS.md")
    old = results_file.read_text() if results_file.exists() else ""
    if SD_SECTION[0] in old and SD_SECTION[1] in old:  # keep the SD-scale table (measured separately)
        lines += [old[old.index(SD_SECTION[0]):old.index(SD_SECTION[1]) + len(SD_SECTION[1])], ""]
    results_file.write_text("\n".join(lines))
    print(f"wrote {out / ('RESULTS_quick.md' if args.quick else 'RESULTS.md')} and {img} in {total:.0f} s")


if __name__ == "__main__":
    main()
