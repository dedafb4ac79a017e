"""benchmark.py --quick: every method and baseline erase one concept, evaluate.py measures them, RESULTS is written;
with two erasure seeds, its means, standard deviations and pooled Wilson intervals against a hand computation from
metrics.json; the budget search's choice against a hand application of its rule; the claims section."""
import dataclasses
import json
import math
import re
import statistics

import benchmark
import benchmark_scales
from conftest import refused


def cells_of(text: str, name: str) -> list[str]:
    line = next(x for x in text.splitlines() if x.startswith(f"| {name} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_quick_benchmark_writes_a_table_per_concept_and_a_figure(tmp_path):
    benchmark.main(["--quick", "--output", str(tmp_path)])
    text = (tmp_path / "RESULTS_quick.md").read_text()
    assert "## circle" in text and "torch" in text and "seeds" in text  # machine, versions and seeds recorded
    rows = re.findall(r"^\| (.+?) \|", text.split("## circle")[1], flags=re.M)
    assert rows[0] == "model" and rows[1:] == ["original model", "ESD", "UCE", "SAGE", "RealEra", "DoCo", "S-GRACE"]
    for name in ("ESD", "S-GRACE"):
        cells = cells_of(text.split("## circle")[1], name)
        assert all(c != "n/a" for c in cells[1:]), cells  # every column measured for an erased model
    assert (tmp_path / "outputs" / "benchmark" / "esd-circle-s0" / "erased.safetensors").exists()
    assert (tmp_path / "outputs" / "benchmark" / "uce-circle" / "erased.safetensors").exists()  # no seed: once
    assert (tmp_path / "docs" / "img" / "benchmark_quick.png").stat().st_size > 1000
    assert not (tmp_path / "RESULTS.md").exists()


def wilson(k, n, z=1.959963984540054):
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return f"[{round(100 * max(0, centre - half), 1):g}, {round(100 * min(1, centre + half), 1):g}]"


def test_two_erasure_seeds_aggregate_as_computed_by_hand(tmp_path):
    # marked sections other commands wrote must survive the rewrite
    kept = ["<!-- sd-scale: by --scale sd -->\nSD TABLE\n<!-- /sd-scale -->",
            "<!-- sets: by --scale sets -->\nSETS TABLE\n<!-- /sets -->"]
    (tmp_path / "RESULTS_quick.md").write_text("# old\n\nold table\n\n" + "\n\n".join(kept) + "\n")
    benchmark.main(["--quick", "--erasure_seeds", "2", "--methods", "esd", "uce", "--jobs", "2", "--output", str(tmp_path)])
    work = tmp_path / "outputs" / "benchmark"
    assert sorted(p.name for p in work.iterdir() if p.is_dir()) == ["esd-circle-s0", "esd-circle-s1", "eval-circle",
                                                                   "uce-circle"]
    seeds = [json.loads((work / f"esd-circle-s{s}" / "config.json").read_text())["args"]["seed"] for s in (0, 1)]
    assert seeds == [0, 1]
    metrics = json.loads((work / "eval-circle" / "metrics.json").read_text())
    rows = {r["name"]: r for r in metrics["rows"]}
    assert list(rows) == ["original", "esd (esd-circle-s0)", "esd (esd-circle-s1)", "uce (uce-circle)"]
    text = (tmp_path / "RESULTS_quick.md").read_text()
    assert all(block in text for block in kept) and "old table" not in text
    table = text.split("## circle")[1]
    header = [c.strip() for c in table.splitlines()[2].strip("|").split("|")]
    esd, uce = cells_of(table, "ESD"), cells_of(table, "UCE")
    assert esd[1] == "2" and uce[1] == "1 (no randomness)"
    pair = [rows["esd (esd-circle-s0)"], rows["esd (esd-circle-s1)"]]
    for key, label in (("efficacy", "concept rate, own prompts %"), ("generality", "concept rate, held-out words %"),
                       ("far", "far accuracy %"), ("asr", "ASR % (UnlearnDiffAtk)")):
        values = [100 * r["counts"][key][0] / r["counts"][key][1] for r in pair]
        k, n = sum(r["counts"][key][0] for r in pair), sum(r["counts"][key][1] for r in pair)
        expected = f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f} {wilson(k, n)}"
        assert esd[header.index(label)] == expected, (key, esd)
        u = rows["uce (uce-circle)"]["counts"][key]
        assert uce[header.index(label)] == f"{100 * u[0] / u[1]:.1f} ± 0.0 {wilson(*u)}"
    seconds = [r["seconds"] for r in pair]
    assert esd[header.index("erasure s")] == f"{statistics.mean(seconds):.0f} ± {statistics.stdev(seconds):.0f}"
    summary = text.split("## Summary")[1].split("## circle")[0]  # one concept: the same numbers as its table
    assert cells_of(summary, "ESD")[1:5] == [esd[1], esd[2], esd[3], esd[header.index("near accuracy %")]]
    assert "Differences called by the rule" in table and "- own-word rate:" in table
    # --reuse after a finished run: no erasure is redone, the evaluation is re-read, the same table
    stamps = {p: p.stat().st_mtime_ns for p in work.glob("*/erased.safetensors")}
    benchmark.main(["--quick", "--erasure_seeds", "2", "--methods", "esd", "uce", "--reuse", "--output", str(tmp_path)])
    assert {p: p.stat().st_mtime_ns for p in work.glob("*/erased.safetensors")} == stamps
    assert (tmp_path / "RESULTS_quick.md").read_text().split("## circle")[1] == table


def hand_rule(journal: list[dict], method: str, points: list[dict], concepts: list[str]) -> dict:
    """docs/budgets.md's rule, applied again from the journal's lines."""
    res = {}
    for e in journal:
        if e.get("kind") == "result" and e["method"] == method:
            res[(json.dumps(e["point"], sort_keys=True), e["concept"])] = e
    scored = []
    for p in points:
        lines = [res[(json.dumps(p, sort_keys=True), c)] for c in concepts]
        in_cap = all(e["cpu_seconds"] <= 120 for e in lines)
        keeps = all(e["far"] >= e["original_far"] - 3 for e in lines)
        rate = sum((e["efficacy"] + e["generality"]) / 2 for e in lines) / len(lines)
        far = sum(e["far"] for e in lines) / len(lines)
        scored.append((p, in_cap, keeps, rate, far, sum(e["cpu_seconds"] for e in lines)))
    ok = [s for s in scored if s[1] and s[2]]
    if ok:
        return min(ok, key=lambda s: (s[3], s[5]))[0]
    return max([s for s in scored if s[1]] or scored, key=lambda s: (s[4], -s[5]))[0]


def test_budget_search_picks_what_the_rule_picks(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(benchmark, "BUDGET_GRIDS", {"esd": {"lr": [2e-3], "iterations": [2, 6]},
                                                    "uce": {"lam": [0.5, 0.02]}})
    argv = ["--select_budgets", "--quick", "--methods", "esd", "uce", "--output", str(tmp_path)]
    chosen = benchmark.main(argv)
    journal_path = tmp_path / "outputs" / "budgets" / "journal.jsonl"
    journal = [json.loads(x) for x in journal_path.read_text().splitlines()]
    assert sum(e["kind"] == "erasure" for e in journal) == 8 and sum(e["kind"] == "result" for e in journal) == 8
    for method in ("esd", "uce"):
        points = benchmark.grid_points(benchmark.BUDGET_GRIDS[method])
        assert chosen[method]["point"] == hand_rule(journal, method, points, ["triangle", "blue"])
    doc = (tmp_path / "docs" / "budgets.md").read_text()
    assert "### ESD" in doc and "### UCE" in doc and doc.count("**") >= 4  # the chosen rows in bold
    assert f"**{benchmark.point_label(chosen['esd']['point'])}**" in doc
    assert " ".join(benchmark.point_flags(chosen["esd"]["point"])) in capsys.readouterr().out
    # --reuse after a finished search: nothing runs again, the same choice
    again = benchmark.main(argv + ["--reuse"])
    assert journal_path.read_text().count("\n") == len(journal) and again == chosen


def test_claims_section_with_verdicts(tmp_path):
    (tmp_path / "RESULTS_quick.md").write_text("# R\n\n<!-- sets: x -->\nSETS\n<!-- /sets -->\n")
    verdicts = benchmark.main(["--claims", "--quick", "--methods", "sgrace", "--erasure_seeds", "2", "--claim_concepts",
                               "circle", "--output", str(tmp_path)])
    work = tmp_path / "outputs" / "benchmark"
    for name in ("sgrace-circle-s3407", "sgrace-circle-s3408", "sgrace_advunlearn-circle-s3407",
                 "sgrace_advunlearn-circle-s3408"):
        assert (work / name / "erased.safetensors").exists(), name
    config = json.loads((work / "sgrace_advunlearn-circle-s3408" / "config.json").read_text())["args"]
    assert config["erase_loss"] == "esd" and config["init"] == "target" and config["seed"] == 3408
    text = (tmp_path / "RESULTS_quick.md").read_text()
    assert "SETS" in text and "<!-- claims" in text and "<!-- /claims -->" in text
    section = text.split("<!-- claims")[1]
    assert section.count("| S-GRACE: more robust") == 1 and "ASR % (UnlearnDiffAtk)" in section
    assert [v["verdict"] in ("holds", "does not hold", "not separable") for v in verdicts] == [True]
    assert "--claims --claim_concepts circle --quick --erasure_seeds 2 --methods sgrace" in section
    assert re.search(r"\*\*claim: (holds|does not hold|not separable)\*\*", section)


def test_sets_mix_objects_and_colours_and_leave_the_development_concepts_out():
    """SETS nest (2 in 4 in 8), mix objects and colours, never hold triangle or blue (another issue's development
    concepts), and in the set's evaluation no near or far prompt asks to keep a member of the set (heart's near
    circle, green's near yellow are members of the 8-set)."""
    import common
    import evaluate

    world = json.loads(common.WORLD_FILE.read_text())
    sizes = sorted(benchmark_scales.SETS)
    assert sizes == [2, 4, 8] and all(len(benchmark_scales.SETS[n]) == n for n in sizes)
    assert all(benchmark_scales.SETS[a] == benchmark_scales.SETS[b][:a] for a, b in zip(sizes, sizes[1:]))
    assert benchmark_scales.SEQUENTIAL == benchmark_scales.SETS[2]
    for members in benchmark_scales.SETS.values():
        assert not {"triangle", "blue"} & set(members)
        assert {c for c in members if c in world["objects"]} and {c for c in members if c in world["colours"]}
    members = benchmark_scales.SETS[8]
    args = evaluate.Args(concept=members, model="toy", seeds=1, far_seeds=1, guidance=3.0)
    for info in common.concept_set(args):
        others = [c for c in members if c != info["name"]]
        suites = evaluate.toy_suites(info, dataclasses.replace(args, concept=info["name"], exclude=others))
        kept = {item["target"] for s in ("near", "far") for item in suites[s]}
        assert kept and not kept & set(members), info["name"]


def journal_row(method, size, mode, own, far):
    return dict(method=method, size=size, mode=mode, code="abc1234", date="2026-12-01", machine="test machine",
                erasure_seconds=10.0, not_erased=["red"] if own[0] > 20 else [],
                counts=dict(efficacy=own, generality=own, near=[0, 0], far=far),
                original=dict(efficacy=[24, 24], generality=[48, 48], near=[0, 0], far=[90, 100]))


def test_sets_section_pools_with_wilson_intervals_and_main_keeps_it(tmp_path):
    """The sets table from journal rows: pooled rates with their Wilson interval (12 of 24: 50.0 [31.4, 68.6]), the
    sequential row, a trend named only where the intervals part; and a rewrite of RESULTS.md by the toy benchmark's
    section writer keeps the sets section as written."""
    rows = [journal_row(m, n, "set", [n * 3, 24], [90 - n * 5, 100]) for m in benchmark.METHODS for n in (2, 4, 8)]
    rows += [journal_row(m, 2, "sequential", [12, 24], [80, 100]) for m in benchmark.METHODS]
    body = benchmark_scales.sets_body(rows, 600.0)
    assert "| ESD sequential | 2 | 50.0 [31.4, 68.6] |" in body and "| original model | 2 (n 24/48/100) |" in body
    assert "- UCE: own-word 25 → 50 → 100 % (rises); far 80 → 70 → 50 % (falls)" in body
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nold text\n")
    benchmark.write_section(results, body, benchmark_scales.SETS_SECTION)
    benchmark.write_section(results, "sd table", benchmark_scales.SD_SECTION)
    text = results.read_text()
    assert text.count(benchmark_scales.SETS_SECTION[0]) == 1 and body in text and "old text" in text and "sd table" in text
    assert set(benchmark.marked_sections(text)) >= {"sets", "sd-scale"}  # what the toy benchmark keeps


def test_closed_form_scale_names_and_peak_memory():
    """100 distinct made-up artists (no comma, so each is one --concept), and VmHWM read from /usr/bin/time -v's
    report in GiB (2097152 kB = 2 GiB); a report without the line gives None."""
    names = benchmark_scales.artist_names(100)
    assert len(set(names)) == 100 and not any("," in n for n in names) and benchmark_scales.artist_names(1) == names[:1]
    report = "\tCommand being timed: \"python uce.py\"\n\tMaximum resident set size (kbytes): 2097152\n"
    assert benchmark_scales.max_rss_gib(report) == 2.0 and benchmark_scales.max_rss_gib("nothing") is None
    times = "\tUser time (seconds): 440.25\n\tSystem time (seconds): 48.56\n"
    assert benchmark_scales.cpu_seconds(times) == 488.8 and benchmark_scales.cpu_seconds("nothing") is None


def test_cross_table_from_metrics_names_only_differences_outside_the_intervals(tmp_path):
    """The cross section from two concepts' metrics.json rows: every model's own-word and held-out cells with their
    Wilson interval (0 of 24: 0.0 [0.0, 13.8]); a method whose red-alone model also erases circle (0 of 24 vs the
    original's 24 of 24) gets that named, one whose cells all overlap gets 'no difference'."""
    models = {m: {"set": tmp_path / f"{m}-set", "circle": tmp_path / f"{m}-circle", "red": tmp_path / f"{m}-red"}
              for m in ("esd", "uce")}

    def row(folder, own):
        return dict(folder=str(folder), counts=dict(efficacy=[own, 24], generality=[own * 2, 48]))

    metrics = {}
    for concept in ("circle", "red"):
        rows = [dict(counts=dict(efficacy=[24, 24], generality=[48, 48]))]
        for m, folders in models.items():
            for key, folder in folders.items():
                erased = key in ("set", concept) or (m == "esd" and key == "red")  # ESD's red erases circle too
                rows.append(row(folder, 0 if erased else 22))
        metrics[concept] = dict(rows=rows)
    body = benchmark_scales.cross_body(["circle", "red"], models, metrics, 120.0, [],
                                       benchmark.Args(scale="cross", methods=["esd", "uce"]))
    assert "| original model | 100.0 [86.2, 100.0] | 100.0 [92.6, 100.0] | 100.0 [86.2, 100.0] |" in body
    assert "| ESD: red alone | 0.0 [0.0, 13.8] | 0.0 [0.0, 7.4] | 0.0 [0.0, 13.8] |" in body
    assert "- ESD: erasing red alone moves circle from 100.0 [86.2, 100.0] % to 0.0 [0.0, 13.8] %." in body
    assert "- UCE: no difference outside the intervals." in body
    assert "--compare MODELS --attack none --far_seeds 1`" in body and "ESD `--train_method noxattn`" in body
    assert "`python benchmark.py --scale cross --methods esd uce`" in body


def test_scale_runs_refuse_the_flags_they_ignore(capsys):
    """--scale sets / cross erase their own concepts with one seed: --concepts, --erasure_seeds, --table_only are
    refused in one sentence before anything runs."""
    for flags in (["--concepts", "square"], ["--erasure_seeds", "3"], ["--table_only"]):
        message = refused(capsys, lambda: benchmark.main(["--scale", "cross", *flags]))
        assert f"leave {flags[0]} out" in message
    # --claims runs on --claim_concepts: --concepts / --table_only would be ignored, a concept twice would give
    # duplicate rows, and a budget-development concept is never reported
    for flags, words in ((["--concepts", "red"], "leave --concepts out"), (["--table_only"], "leave --table_only out"),
                         (["--claim_concepts", "circle", "circle"], "names a concept twice"),
                         (["--claim_concepts", "triangle", "red"], "budget-development concept")):
        assert words in refused(capsys, lambda: benchmark.main(["--claims", *flags]))


def test_cross_reuses_a_one_concept_folder_only_with_the_same_settings(tmp_path):
    """same_settings: the concept, output and ESD's train_method may differ; a budget flag may not; no model, no."""
    def model(name, **args):
        (tmp_path / name).mkdir()
        (tmp_path / name / "erased.safetensors").write_bytes(b"x")
        (tmp_path / name / "config.json").write_text(json.dumps(dict(args=args)))
        return tmp_path / name

    the_set = model("set", concept=["circle", "red"], output="a", train_method="noxattn", lr=1e-4, seed=0)
    assert benchmark_scales.same_settings(model("same", concept="circle", output="b", train_method="esd-u", lr=1e-4, seed=0),
                                   the_set)
    assert not benchmark_scales.same_settings(model("other", concept="circle", output="b", lr=2e-4, seed=0), the_set)
    assert not benchmark_scales.same_settings(tmp_path / "missing", the_set)
