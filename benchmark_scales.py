"""benchmark_scales.py: benchmark.py's --scale runs, beyond the miniature-world table of six methods on three concepts.

    python benchmark.py --scale sd --model outputs/sd14-random   # memory and cost at SD v1.4 size (hours on a CPU)
    python benchmark.py --scale sets    # 2, 4 and 8 concepts at once, and two one after the other (~1 h on one core)
    python benchmark.py --scale cross   # circle + red erased together vs each alone, on each concept
    python benchmark.py --scale closed_form --model outputs/sd14-random --device cpu   # UCE, RealEra: 1 vs 100 artists

`--scale sd` runs each method on a full-size SD v1.4 (`python sdscale.py` builds one with random weights;
the real weights measure the same) with its SD defaults, cutting only the iteration count and the sampling
steps (SD_CUTS), once at full precision and once with --mixed_precision, and tabulates per phase the peak
memory (torch.cuda.max_memory_allocated on a GPU, the process's peak resident memory on a CPU) and the
seconds per training iteration relative to ESD's. Each finished run is appended to
outputs/benchmark-sd/runs.jsonl at once (a cut-off loses one row), and the table replaces the SD-scale
section of RESULTS.md.

`--scale sets` erases the miniature world's sets of 2, 4 and 8 concepts (SETS) with every method in one run each,
and the 2-concept set one concept after the other (--start_from), evaluates each set size in one evaluate.py set
evaluation and writes the sets section of RESULTS.md (journal: outputs/benchmark-sets/runs.jsonl). `--scale
closed_form` measures UCE's and RealEra's closed-form solve for 1 and 100 made-up artists on a full-size model
(journal: outputs/benchmark-closed-form/runs.jsonl; its own RESULTS.md section). `--scale cross` erases circle and
red together and each alone (reusing the toy benchmark's first-seed folders when their settings match) and
evaluates every model on both concepts: RESULTS.md's cross-concept table. A toy rerun of benchmark.py keeps every
such section.

The command line, the processes, journals and statistics are benchmark.py's (imported from there).
"""
import functools
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import common
import evaluate
from benchmark import (HERE, LABELS, METHODS, append_line, command_line, erasure_flags, evaluate_folders, git_commit,
                       machine, method_seeds, read_journal_lines, rows_by_folder, run_erasure, run_jobs, seed_folder,
                       write_section)

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
# --scale sets: the miniature world's sets (objects and colours mixed; never triangle or blue, which another issue
# keeps as development concepts), each erased in one run by every method at its default toy settings, and the
# sequential run (SEQUENTIAL[0], then SEQUENTIAL[1] with --start_from) that a user of one-concept code would make.
SETS = {2: ["circle", "red"], 4: ["circle", "red", "square", "green"],
        8: ["circle", "red", "square", "green", "star", "purple", "heart", "yellow"]}
SEQUENTIAL = ["circle", "red"]
# A set of objects and colours needs one ESD parameter group (an object's default is ESD-u, a colour's ESD-x; esd.py
# asks for --train_method): the first member's, circle's ESD-u. The sequential runs keep each concept's own default.
SET_FLAGS = {"esd": ["--train_method", "noxattn"]}
# Evaluation of every set run (evaluate.py's set mode, no attack): the fewest seeds that keep the whole --scale sets
# run near an hour on one core (per concept: 3 own-word, 6 held-out, 3 near and 3 per far concept per seed).
SETS_SEEDS, SETS_FAR_SEEDS = 2, 1
SETS_SECTION = ("<!-- sets: written by python benchmark.py --scale sets -->", "<!-- /sets -->")
# --scale closed_form: UCE's and RealEra's closed-form solve on the full-size model for 1 and for 100 made-up artists
# (weights are random, so only the names' token counts matter): 10 first names x 10 family names.
FIRST_NAMES = ["anna", "boris", "clara", "dmitri", "elena", "felix", "greta", "hugo", "ines", "jonas"]
FAMILY_NAMES = ["albrecht", "bellamy", "castellano", "dufresne", "eriksson", "fontaine", "gallagher", "hartmann",
                "ivanova", "jablonski"]
# --scale cross: the cross-concept table. SETS[2] erased in one run vs each of its concepts erased alone (the toy
# benchmark's first-seed folders when their settings match, else erased here), every model evaluated on each concept.
CROSS_EVAL = ["--attack", "none", "--far_seeds", "1"]  # own-word and held-out rates only; far is not tabulated
CROSS_SECTION = ("<!-- cross: written by python benchmark.py --scale cross -->", "<!-- /cross -->")
# config.json `args` that may differ between a one-concept run and the set run and still be the same settings
CROSS_FREE_ARGS = {"concept", "concept_file", "output", "train_method", "start_from", "samples", "kind", "words"}
CLOSED_FORM_RUNS = [("uce", 1), ("uce", 100), ("realera", 1), ("realera", 100)]
CLOSED_FORM_FLAGS = {"uce": [], "realera": ["--stage", "closed_form"]}  # RealEra: stage 1 (Eq. 3) alone
CLOSED_FORM_SECTION = ("<!-- closed-form: written by python benchmark.py --scale closed_form -->", "<!-- /closed-form -->")




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
    done = read_journal_lines(journal)
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
            append_line(journal, row)
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
        "the iteration count and the sampling steps (benchmark_scales.py SD_CUTS; samples.png with 2 DDIM steps). Memory: "
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
    write_section(Path(args.output) / "RESULTS.md", body, SD_SECTION)
    write_doc_sections(rows, Path(args.output) / "docs", args.model)
    print(f"wrote the SD-scale table into {Path(args.output) / 'RESULTS.md'} and docs/<method>.md ({journal})")


# ---------------------------------------------------------------------------------------------
# --scale sets: 2, 4 and 8 concepts at once on the miniature world, and a sequential run
# ---------------------------------------------------------------------------------------------
def erase_set(method: str, concepts: list[str], folder: Path, start_from: Path | None = None, extra=()) -> dict:
    """One method erases `concepts` (one run, toy defaults) into `folder`, in its own process, optionally from an
    erased model (--start_from); returns its config.json. A failed run stops the benchmark with its last line."""
    cmd = [sys.executable, str(HERE / f"{method}.py"), "--model", "toy", "--output", str(folder.resolve()),
           *[flag for c in concepts for flag in ("--concept", c)],
           *(["--start_from", str(start_from.resolve())] if start_from else []), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        common.die(f"{method} on {'+'.join(concepts)} failed: "
                   f"{((done.stderr or done.stdout).strip().splitlines() or ['?'])[-1]}")
    return json.loads((folder / "config.json").read_text())


def pooled_counts(results: dict, row: int) -> dict:
    """{suite: [hits, images]} of table row `row` (0: original) summed over the concepts of an evaluate_set result
    {concept: main's rows}: every image of every concept's evaluation counts once."""
    counts = {}
    for rows in results.values():
        for suite in ("efficacy", "generality", "near", "far"):
            k, n = rows[row]["counts"].get(suite, [0, 0])
            counts[suite] = [counts.get(suite, [0, 0])[0] + k, counts.get(suite, [0, 0])[1] + n]
    return counts


def sets_erasure(method: str, size: int, mode: str, work: Path, reuse: bool) -> tuple[Path, dict]:
    """`method` erases SETS[size] in one run (mode 'set') or SEQUENTIAL one after the other (mode 'sequential': the
    second run --start_from the first); returns the erased model's folder and what the journal records of the
    erasure (seconds from config.json; sequential: both runs added). With `reuse`, a finished folder is kept."""
    concepts = SETS[size] if mode == "set" else SEQUENTIAL
    name = f"{method}-{size}" if mode == "set" else f"{method}-sequential"
    folders = [work / name] if mode == "set" else [work / f"{name}-first", work / name]
    configs = []
    for k, folder in enumerate(folders):
        if not (reuse and (folder / "erased.safetensors").exists()):
            erase_set(method, concepts if mode == "set" else concepts[k:k + 1], folder,
                      start_from=folders[0] if k else None, extra=SET_FLAGS.get(method, []) if mode == "set" else [])
        configs.append(json.loads((folder / "config.json").read_text()))
    return work / name, dict(method=method, size=size, mode=mode, concepts=concepts, folder=str(work / name),
                             erasure_seconds=round(sum(c["seconds"] for c in configs), 2),
                             run_seconds=[c["seconds"] for c in configs])


def sets_evaluation(concepts: list[str], folders: list[Path], out: Path) -> tuple[dict, dict]:
    """evaluate.py's set mode on the erased models `folders` (all of one set size, one table: the original model's
    images are drawn once), no attack, SETS_SEEDS / SETS_FAR_SEEDS. Returns {folder: its journal fields (pooled
    counts, own-word rate per concept, concepts flagged not erased)} and the original's pooled counts."""
    shutil.rmtree(out, ignore_errors=True)  # evaluate.py refuses to start over an unfinished evaluation
    results = evaluate.main(["--model", "toy", *[f for c in concepts for f in ("--concept", c)], "--erased",
                             *map(str, folders), "--attack", "none", "--seeds", str(SETS_SEEDS), "--far_seeds",
                             str(SETS_FAR_SEEDS), "--output", str(out)])
    flags = json.loads((out / "set_metrics.json").read_text())["not_erased"]
    rows = {}
    for row, folder in enumerate(folders, start=1):
        name = next(iter(results.values()))[row]["name"]
        rows[folder] = dict(counts=pooled_counts(results, row), own_word={c: r[row].get("efficacy") for c, r in
                                                                            results.items()},
                            not_erased=[f["concept"] for f in flags if f["model"] == name])
    return rows, pooled_counts(results, 0)


def rate_cell(kn: list[int]) -> str:
    """'38.5 [30.1, 47.6]': a pooled rate in % with its 95 % Wilson interval; '–' without images."""
    k, n = kn
    if not n:
        return "–"
    low, high = evaluate.wilson_interval(k, n)
    return f"{100 * k / n:.1f} [{low:.1f}, {high:.1f}]"


def seconds_cell(seconds: float) -> str:
    """Seconds as the table shows them: one decimal below 10 s (UCE's closed form), whole seconds above."""
    return f"{seconds:.1f}" if seconds < 10 else f"{seconds:.0f}"


def trend(rows: list[dict], suite: str) -> str:
    """How a pooled rate moves from the smallest to the largest set, in words only where the 95 % Wilson intervals
    of the two ends do not overlap; otherwise 'no change beyond the intervals'."""
    (k0, n0), (k1, n1) = rows[0]["counts"][suite], rows[-1]["counts"][suite]
    if not (n0 and n1 and all(r["counts"][suite][1] for r in rows)):
        return "not measured"
    (lo0, hi0), (lo1, hi1) = evaluate.wilson_interval(k0, n0), evaluate.wilson_interval(k1, n1)
    path = " → ".join(f"{100 * r['counts'][suite][0] / r['counts'][suite][1]:.0f}" for r in rows)
    verdict = "rises" if lo1 > hi0 else "falls" if hi1 < lo0 else "no change beyond the intervals"
    return f"{path} % ({verdict})"


def sets_body(done: list[dict], seconds: float | None) -> str:
    """The sets section of RESULTS.md from the journal's result rows (and the whole run's `seconds`, if known): the
    table, the protocol and one line per method."""
    rows = {(r["method"], r["size"], r["mode"]): r for r in done}
    far_concepts = {size: r["original"]["far"][1] / (size * 3 * SETS_FAR_SEEDS) for (_, size, mode), r in rows.items()
                    if mode == "set"}  # far prompts: 3 templates per concept and far seed
    first = next(iter(done))
    lines = ["## Several concepts at once: 2, 4 and 8 on the miniature world", "",
             f"Measured {first['date']} on {first['machine']} with `python benchmark.py --scale sets` (code "
             f"{', '.join(sorted({r['code'] for r in done}))}" + (f"; {seconds / 60:.0f} min in all" if seconds else "")
             + "). Sets: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in SETS.items()) + ". Each method erases the "
             "set in one run at its default toy settings (docs/concepts.md, \"Several concepts at once\"), plus "
             + "; ".join(f"{LABELS[m]} `{' '.join(f)}`" for m, f in SET_FLAGS.items()) + " (one parameter group for "
             "objects and colours: the first member's default; the sequential runs keep each concept's own default, "
             "for ESD its kind's parameter group); "
             f"`sequential`: {SEQUENTIAL[0]} erased alone, then {SEQUENTIAL[1]} erased from that model with "
             "`--start_from` (the saved model holds both runs' tensors), as a user of one-concept code would do.", "",
             f"Protocol: `evaluate.py --model toy --concept A --concept B ... --erased MODEL --attack none --seeds "
             f"{SETS_SEEDS} --far_seeds {SETS_FAR_SEEDS}` (set mode: one evaluation per concept of the set; 25 DDIM "
             f"steps, guidance 3, seeds 0..{SETS_SEEDS - 1} per own-word, held-out and near prompt and "
             f"{SETS_FAR_SEEDS} per far prompt; each set size is one evaluation, every model of that size a row of it, "
             "so the original's images are drawn once per size). Own-word and held-out rate: % of images the judge labels as the "
             "erased concept, pooled over the set's concepts (lower = better erased). Far accuracy: % of images "
             "showing the prompted concept, over concepts outside the set (the set's members, and members' near "
             "neighbours that are themselves in the set, are left out of near and far specificity), pooled over "
             "the concepts' evaluations. Brackets: 95 % Wilson interval over the pooled images (n: images per "
             "column). Erasure s: config.json `seconds` (sequential: both runs added), on a CPU shared with other "
             "work. Not erased: concepts whose own-word rate stays above the original's minus 20 points "
             "(evaluate.py --set_margin). The far concepts differ between set sizes: a larger set leaves fewer "
             "concepts outside it (on average " + ", ".join(f"{far_concepts[n]:.3g}" for n in sorted(far_concepts))
             + " far concepts per erased concept at " + ", ".join(map(str, sorted(far_concepts))) + " concepts), so "
             "far accuracy at each size is "
             "measured on different concepts; the original model's row of each size is its reference. With "
             f"{SETS_SEEDS} seeds per prompt the 2-concept rates rest on few images (the n of the original's row): "
             "read the intervals before the rates.", "",
             "| model | concepts | own-word rate % ↓ | held-out rate % ↓ | far accuracy % | erasure s | not erased |",
             "|---|---|---|---|---|---|---|"]
    for size in SETS:
        originals = [r for r in done if r["size"] == size and r["mode"] == "set"]
        if originals:
            o = originals[0]["original"]
            n = "/".join(str(o[s][1]) for s in ("efficacy", "generality", "far"))
            lines.append(f"| original model | {size} (n {n}) | {rate_cell(o['efficacy'])} | "
                         f"{rate_cell(o['generality'])} | {rate_cell(o['far'])} | – | – |")
        for method in METHODS:
            for mode in ("set", "sequential") if size == 2 else ("set",):
                r = rows.get((method, size, mode))
                if r is None:
                    continue
                label = LABELS[method] + (" sequential" if mode == "sequential" else "")
                c = r["counts"]
                lines.append(f"| {label} | {size} | {rate_cell(c['efficacy'])} | {rate_cell(c['generality'])} | "
                             f"{rate_cell(c['far'])} | {seconds_cell(r['erasure_seconds'])} | "
                             f"{', '.join(r['not_erased']) or '–'} |")
    lines += ["", "With the number of concepts (own-word rate, then far accuracy, for 2 → 4 → 8 concepts; a change is "
              "named only where the 95 % intervals of 2 and 8 do not overlap):", ""]
    for method in METHODS:
        series = [rows[(method, size, "set")] for size in SETS if (method, size, "set") in rows]
        if len(series) < 2:
            continue
        seq = rows.get((method, 2, "sequential"))
        together = rows.get((method, 2, "set"))
        line = f"- {LABELS[method]}: own-word {trend(series, 'efficacy')}; far {trend(series, 'far')}"
        if seq and together:
            line += (f"; two concepts one after the other vs together: own-word "
                     f"{rate_cell(seq['counts']['efficacy'])} vs {rate_cell(together['counts']['efficacy'])} %, far "
                     f"{rate_cell(seq['counts']['far'])} vs {rate_cell(together['counts']['far'])} %, "
                     f"{seconds_cell(seq['erasure_seconds'])} vs {seconds_cell(together['erasure_seconds'])} s")
        lines.append(line + ".")
    return "\n".join(lines + [""])


def sets_scale(args):
    """--scale sets: every method on SETS (and the SEQUENTIAL run), evaluated as sets, one evaluation per set size
    (the sequential models join the 2-concept one). Each finished erasure is appended to
    outputs/benchmark-sets/runs.jsonl at once, and each finished evaluation adds its rows; with --reuse, finished
    erasures and evaluated rows there are skipped (a cut-off loses at most one erasure, or the evaluation of one
    set size). Then the sets section of RESULTS.md (SETS_SECTION) is rewritten from the journal."""
    work = Path(args.output) / "outputs" / "benchmark-sets"
    work.mkdir(parents=True, exist_ok=True)
    journal = work / "runs.jsonl"
    if not args.reuse and journal.exists():
        journal.rename(journal.with_name(f"runs-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"))  # kept, not reused
    entries = read_journal_lines(journal)
    done = {(r["method"], r["size"], r["mode"]): r for r in entries if r.get("kind") == "result"}
    start, ran = time.time(), False
    for size in SETS:
        runs = [(m, size, "set") for m in args.methods] + ([(m, 2, "sequential") for m in args.methods]
                                                             if size == len(SEQUENTIAL) else [])
        runs = [key for key in runs if key not in done]
        if not runs:
            continue
        erasures = {}
        for method, _, mode in runs:
            folder, erasure = sets_erasure(method, size, mode, work, args.reuse)
            erasure.update(kind="erasure", code=git_commit(), date=time.strftime("%Y-%m-%d"), machine=machine())
            append_line(journal, erasure)
            erasures[folder] = erasure
            print(f"{method} {mode} {size}: erased in {erasure['erasure_seconds']} s "
                  f"({(time.time() - start) / 60:.1f} min so far)", flush=True)
        rows, original = sets_evaluation(SETS[size], list(erasures), work / f"eval-{size}")
        ran = True
        for folder, erasure in erasures.items():
            row = dict(erasure, kind="result", original=original, **rows[folder])
            append_line(journal, row)
            done[(row["method"], row["size"], row["mode"])] = row
            print(f"{row['method']} {row['mode']} {size}: own-word {rate_cell(row['counts']['efficacy'])} %, far "
                  f"{rate_cell(row['counts']['far'])} %", flush=True)
    if ran:  # this session's time; a --reuse session adds its own, so the section shows the whole run's
        append_line(journal, dict(kind="total", seconds=round(time.time() - start, 1)))
    total = sum(r["seconds"] for r in read_journal_lines(journal) if r.get("kind") == "total")
    write_section(Path(args.output) / "RESULTS.md", sets_body(list(done.values()), total or None), SETS_SECTION)
    print(f"wrote the sets section of {Path(args.output) / 'RESULTS.md'} ({journal})")


# ---------------------------------------------------------------------------------------------
# --scale cross: the set vs each concept erased alone, on each concept
# ---------------------------------------------------------------------------------------------
def cross_eval(quick: bool) -> list[str]:
    """evaluate.py's flags for the cross table: CROSS_EVAL, or with --quick the benchmark's QUICK_EVAL, no attack."""
    return ["--attack", "none", "--seeds", "2", "--far_seeds", "1"] if quick else CROSS_EVAL  # QUICK_EVAL, no attack


def same_settings(folder: Path, reference: Path) -> bool:
    """Whether the erased model `folder` was made with `reference`'s settings (config.json `args`), apart from
    which concept(s) it erased and where it was written (CROSS_FREE_ARGS)."""
    if not (folder / "erased.safetensors").exists():
        return False
    a, b = (json.loads((f / "config.json").read_text()).get("args", {}) for f in (folder, reference))
    return {k: v for k, v in a.items() if k not in CROSS_FREE_ARGS} == \
        {k: v for k, v in b.items() if k not in CROSS_FREE_ARGS}


def cross_body(concepts: list[str], models: dict, metrics: dict, seconds: float, reused: list[str], args) -> str:
    """The cross section of RESULTS.md: per method, its set model and each one-concept model, on each concept
    (own-word and held-out rate with 95 % Wilson intervals), and one line per method naming only the differences
    whose intervals do not overlap."""
    rows = {c: rows_by_folder(metrics[c]) for c in concepts}

    def cell(concept, folder, suite):
        row = rows[concept]["original" if folder == "original" else str(Path(folder).resolve())]
        return row["counts"].get(suite, [0, 0])

    def apart(a, b):  # 95 % intervals that do not overlap
        (la, ha), (lb, hb) = (evaluate.wilson_interval(*x) for x in (a, b))
        return ha < lb or hb < la

    names, quick = " + ".join(concepts), args.quick
    set_flags = "; ".join(f"{LABELS[m]} `{' '.join(f)}`" for m, f in SET_FLAGS.items() if m in models)
    lines = ["## Erasing two concepts together vs each alone (cross-concept table)", "",
             f"Measured {time.strftime('%Y-%m-%d')} on {machine()} with `{command_line(args, '--scale', 'cross')}` "
             f"(code {git_commit()}, {seconds / 60:.0f} min). Each method erases {names} in one run (as in the sets "
             "section" + (f": {set_flags}, the first member's parameter group" if set_flags else "") + ") and each "
             "concept alone" + (" (each with its own kind's default)" if set_flags else "") + ", at its "
             + ("--quick budget" if quick else "default toy settings") + " and first erasure seed" + (f"; the one-concept models are the toy benchmark's own "
             f"first-seed folders ({len(reused)} of {len(models) * len(concepts)} reused: same settings)" if reused
             else "") + ". Every model is evaluated on each concept with `evaluate.py --model toy --concept C --compare "
             f"MODELS {' '.join(cross_eval(quick))}` (the other concept "
             "`--exclude`d from near and far): % of images the judge labels as the concept, for its own words and "
             "its held-out words (lower = better erased). The prompts' filler words avoid the excluded concept, so "
             "they (and the rates) differ from the toy benchmark's for the same one-concept models. Brackets: 95 % "
             "Wilson interval. Read a row across: "
             "whether erasing one concept also erases (or protects) the other, and whether erasing the set erases "
             "each concept as much as erasing it alone." + (" --quick budgets: NOT a result." if quick else ""), "",
             "| model | " + " | ".join(f"{c} own-word % ↓ | {c} held-out % ↓" for c in concepts) + " |",
             "|---" * (1 + 2 * len(concepts)) + "|"]
    line = lambda label, folder: lines.append(f"| {label} | " + " | ".join(
        f"{rate_cell(cell(c, folder, 'efficacy'))} | {rate_cell(cell(c, folder, 'generality'))}" for c in concepts) + " |")
    line("original model", "original")
    notes = []
    for method, folders in models.items():
        line(f"{LABELS[method]}: {names} together", folders["set"])
        for c in concepts:
            line(f"{LABELS[method]}: {c} alone", folders[c])
        found = []
        for c in concepts:
            together, alone = cell(c, folders["set"], "efficacy"), cell(c, folders[c], "efficacy")
            if apart(together, alone):
                found.append(f"on {c}, the set leaves {rate_cell(together)} % vs {rate_cell(alone)} % for {c} alone")
            for other in concepts:
                if other != c:
                    by_other, original = cell(c, folders[other], "efficacy"), cell(c, "original", "efficacy")
                    if apart(by_other, original):
                        found.append(f"erasing {other} alone moves {c} from {rate_cell(original)} % to "
                                     f"{rate_cell(by_other)} %")
        notes.append(f"- {LABELS[method]}: " + ("; ".join(found) if found else
                                                 "no difference outside the intervals") + ".")
    lines += ["", "Differences whose 95 % intervals do not overlap (own-word rate):", "", *notes, ""]
    return "\n".join(lines)


def cross_scale(args):
    """--scale cross: every method erases SETS[2] in one run (outputs/benchmark-cross/<method>-set) and each of its
    concepts alone (the toy benchmark's first-seed folder outputs/benchmark/<method>-<concept>-s<seed> when it holds
    a model of the same settings, else outputs/benchmark-cross/<method>-<concept>), --jobs at a time; then one
    evaluate.py run per concept over every model; then the cross section of RESULTS.md (CROSS_SECTION). With
    --reuse, a finished set erasure is kept."""
    concepts = SETS[2]
    # --quick models (a tenth of each budget) never share a folder with the full run's, so --reuse cannot mix them
    bench = Path(args.output) / "outputs" / "benchmark"
    work = Path(args.output) / "outputs" / ("benchmark-cross-quick" if args.quick else "benchmark-cross")
    work.mkdir(parents=True, exist_ok=True)
    start, models, reused = time.time(), {}, []
    seeds = {method: method_seeds(method, 1)[0] for method in args.methods}
    flags = {method: erasure_flags(method, seed, args.quick) for method, seed in seeds.items()}
    for method in args.methods:  # the set models first: their settings decide which one-concept folders fit
        folder = work / f"{method}-set"
        if not (args.reuse and (folder / "erased.safetensors").exists()):
            erase_set(method, concepts, folder, extra=[*SET_FLAGS.get(method, []), *flags[method]])
        models[method] = {"set": folder}
        print(f"{method}: {'+'.join(concepts)} erased ({(time.time() - start) / 60:.1f} min so far)", flush=True)
    jobs = []
    for method in args.methods:
        for concept in concepts:
            folder = seed_folder(bench, method, concept, seeds[method])
            if same_settings(folder, models[method]["set"]):
                reused.append(str(folder))
            else:
                folder = work / f"{method}-{concept}"
                if not (args.reuse and same_settings(folder, models[method]["set"])):
                    jobs.append(dict(name=str(folder), run=functools.partial(run_erasure, method, concept, folder, flags[method])))
            models[method][concept] = folder
    run_jobs(jobs, args.jobs)
    metrics = {}

    def evaluation(concept):
        folders = [f for m in models.values() for f in m.values()]
        others = [c for c in concepts if c != concept]
        metrics[concept] = evaluate_folders(concept, folders, work / f"eval-{concept}",
                                            [*cross_eval(args.quick), "--exclude", *others],
                                            resume=False)
        print(f"eval-{concept}: {metrics[concept]['evaluation_seconds']:.0f} s", flush=True)

    run_jobs([dict(name=c, run=functools.partial(evaluation, c)) for c in concepts], args.jobs)
    body = cross_body(concepts, models, metrics, time.time() - start, reused, args)
    results = Path(args.output) / ("RESULTS_quick.md" if args.quick else "RESULTS.md")
    write_section(results, body, CROSS_SECTION)
    print(f"wrote the cross section of {results}")
    return body


# ---------------------------------------------------------------------------------------------
# --scale closed_form: UCE's and RealEra's closed form for 1 and 100 concepts on the full-size model
# ---------------------------------------------------------------------------------------------
def artist_names(n: int) -> list[str]:
    """`n` (at most 100) made-up artist names, 'anna albrecht', 'anna bellamy', ...: random weights have no
    artists, so only how many tokens each name takes matters."""
    return [f"{first} {family}" for first in FIRST_NAMES for family in FAMILY_NAMES][:n]


def max_rss_gib(time_output: str) -> float | None:
    """The process peak resident memory (VmHWM) that /usr/bin/time -v reports, in GiB."""
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", time_output)
    return round(int(found.group(1)) / 2**20, 2) if found else None


def cpu_seconds(time_output: str) -> float | None:
    """The process's CPU seconds (user + system) that /usr/bin/time -v reports: unlike wall-clock seconds, not
    stretched by other work on the machine."""
    found = [re.search(rf"{kind} time \(seconds\): ([\d.]+)", time_output) for kind in ("User", "System")]
    return round(sum(float(f.group(1)) for f in found), 1) if all(found) else None


def closed_form_run(method: str, n: int, args, work: Path) -> dict:
    """One closed-form erasure of `n` made-up artists (a concept file holding them as a list, kind style) on the
    full-size model under /usr/bin/time -v; its journal row: the stacked system's rows, the edited matrices' shapes,
    the solve's and the whole erasure's seconds, and the process peak memory."""
    from safetensors import safe_open

    concept_file = work / f"artists{n}.json"
    concept_file.write_text(json.dumps([dict(name=a, kind="style", words=[a]) for a in artist_names(n)], indent=1))
    folder = work / f"{method}-{n}"
    cmd = ["/usr/bin/time", "-v", sys.executable, str(HERE / f"{method}.py"), "--model", args.model, "--device",
           args.device, "--concept_file", str(concept_file), "--samples", "an artwork", "--sample_steps", "1",
           "--output", str(folder.resolve()), *CLOSED_FORM_FLAGS[method]]
    start = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True)
    row = dict(method=method, concepts=n, command=shlex.join(["python", *cmd[3:]]).replace(str(HERE) + "/", ""),
               returncode=done.returncode, process_seconds=round(time.time() - start, 1),
               max_rss_gib=max_rss_gib(done.stderr), process_cpu_seconds=cpu_seconds(done.stderr))
    if done.returncode != 0:
        row["error"] = "killed (out of memory)" if done.returncode in (-9, 137) else \
            ([line for line in done.stderr.splitlines() if line.startswith("error")] or ["?"])[-1]
        return row
    config = json.loads((folder / "config.json").read_text())
    with safe_open(folder / "erased.safetensors", framework="pt") as f:
        shapes = sorted({tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    solve = config["profile"]["training" if method == "uce" else "closed_form"]
    row.update(erased_rows=config.get("erased_token_vectors"), preserved_rows=config.get("preserved_token_vectors"),
               prompts=len(config.get("erase_prompts") or config.get("concept_prompts") or []),
               matrices=config["changed_tensors"], weight_shapes=shapes,
               solve_seconds=solve["seconds"], caching_seconds=config["profile"].get("caching", {}).get("seconds"),
               erasure_seconds=config["seconds"], peak_memory_mb=config.get("peak_memory_mb"))
    return row


def closed_form_scale(args):
    """--scale closed_form: CLOSED_FORM_RUNS on --model (a full-size SD v1.4, random weights), one process each, one
    at a time; each finished run appended to outputs/benchmark-closed-form/runs.jsonl (--reuse skips those there),
    then the closed-form section of RESULTS.md (CLOSED_FORM_SECTION) rewritten from the journal."""
    import torch

    if not args.table_only and not (Path(args.model) / "model_index.json").exists():
        common.die(f"{args.model} is not a pipeline folder; build one with: python sdscale.py --output {args.model}")
    if not args.table_only and not Path("/usr/bin/time").exists():
        common.die("--scale closed_form measures peak memory with /usr/bin/time -v, which this machine lacks "
                   "(Debian/Ubuntu: apt-get install time).")
    args.device = args.device or common.default_device()
    work = Path(args.output) / "outputs" / "benchmark-closed-form"
    work.mkdir(parents=True, exist_ok=True)
    journal = work / "runs.jsonl"
    done = read_journal_lines(journal) if args.reuse or args.table_only else []
    for method, n in [] if args.table_only else CLOSED_FORM_RUNS:
        if any((r["method"], r["concepts"]) == (method, n) and r["returncode"] == 0 for r in done):
            continue
        row = closed_form_run(method, n, args, work)
        row.update(code=git_commit(), date=time.strftime("%Y-%m-%d"), machine=machine(torch.get_num_threads()))
        append_line(journal, row)
        done = [r for r in done if (r["method"], r["concepts"]) != (method, n)] + [row]
        print(f"{method} x {n}: {row.get('solve_seconds', row.get('error'))} s solve, {row['max_rss_gib']} GiB peak",
              flush=True)
    if not done:
        common.die(f"{journal} holds no run yet; run without --table_only first.")
    lines = ["## Closed form at SD v1.4 size: 1 vs 100 concepts", "",
             f"Measured {done[-1]['date']} on {' / '.join(sorted({r['machine'] for r in done}))} with `python benchmark.py --scale closed_form "
             f"--model {args.model} --device {args.device}` (a full-size SD v1.4 with random weights and the real CLIP "
             "tokenizer, `python sdscale.py`; code " + ", ".join(sorted({r['code'] for r in done})) + "). The artists "
             "are made-up names (`anna albrecht`, ..., benchmark_scales.py FIRST_NAMES x FAMILY_NAMES; kind style, one word "
             "each): with random weights only their token counts matter. UCE runs whole (its edit is the closed "
             "form); RealEra runs its closed-form stage alone (`--stage closed_form`, Eq. 3 with its neighbour and "
             "beyond-concept perturbations; the LoRA stage is not run). Rows: token vectors stacked into the least-"
             "squares system (erased + preserved). Every edited projection solves one d_in x d_in system (d_in 768, "
             "the text width) for a d_out x d_in weight; the solve's cost grows with the rows only through the Gram "
             "sums. Solve s: the method's closed-form phase (UCE: `training`; RealEra: `closed_form`, which includes "
             "drawing its perturbations); erasure s: config.json `seconds`; process s: the whole command, loading "
             "and samples.png (1 DDIM step) included; process CPU s: its user + system seconds (`/usr/bin/time -v`), "
             "the one column that other work on the machine does not stretch; peak: the process's VmHWM from "
             "`/usr/bin/time -v`. A CPU shared with other work: wall-clock seconds are indicative, memory is not "
             "load-dependent.", "",
             "| method | concepts | rows (erased + preserved) | edited weights (shapes) | solve s | erasure s | "
             "process s | process CPU s | peak GiB |", "|---|---|---|---|---|---|---|---|---|"]
    order = {key: i for i, key in enumerate(CLOSED_FORM_RUNS)}
    for r in sorted(done, key=lambda r: order.get((r["method"], r["concepts"]), 99)):
        if r["returncode"] != 0:
            lines.append(f"| {LABELS[r['method']]} | {r['concepts']} | {r['error']} | – | – | – | "
                         f"{r['process_seconds']} | {r.get('process_cpu_seconds') or '–'} | {r['max_rss_gib']} |")
            continue
        shapes = ", ".join("x".join(map(str, s)) for s in r["weight_shapes"])
        lines.append(f"| {LABELS[r['method']]} | {r['concepts']} | {r['erased_rows']} + {r['preserved_rows']} | "
                     f"{r['matrices']} ({shapes}) | {r['solve_seconds']} | {r['erasure_seconds']} | "
                     f"{r['process_seconds']} | {r.get('process_cpu_seconds') or '–'} | {r['max_rss_gib']} |")
    for method, n in CLOSED_FORM_RUNS:
        if not any((r["method"], r["concepts"]) == (method, n) for r in done):
            lines.append(f"| {LABELS[method]} | {n} | not measured yet (`--reuse` runs what is missing) | – | – | – | – | – | – |")
    lines += ["", "Commands (as run; the concept files are written by benchmark_scales.py):", ""]
    lines += [f"- `{r['command']}`" for r in sorted(done, key=lambda r: order.get((r["method"], r["concepts"]), 99))]
    write_section(Path(args.output) / "RESULTS.md", "\n".join(lines + [""]), CLOSED_FORM_SECTION)
    print(f"wrote the closed-form section of {Path(args.output) / 'RESULTS.md'} ({journal})")


if __name__ == "__main__":  # the command line is benchmark.py's: `python benchmark.py --scale ...`
    import benchmark

    benchmark.main()
