"""benchmark.py --quick: every method and baseline erase one concept, evaluate.py measures them, RESULTS is written."""
import dataclasses
import json
import re

import benchmark


def test_quick_benchmark_writes_a_table_per_concept_and_a_figure(tmp_path):
    benchmark.main(["--quick", "--output", str(tmp_path)])
    text = (tmp_path / "RESULTS_quick.md").read_text()
    assert "## circle" in text and "torch" in text and "seeds" in text  # machine, versions and seeds recorded
    rows = re.findall(r"^\| (.+?) \|", text, flags=re.M)
    assert rows[0] == "model" and rows[1:] == ["original model", "ESD", "UCE", "SAGE", "RealEra", "DoCo", "S-GRACE"]
    for line in text.splitlines():
        if line.startswith("| ESD") or line.startswith("| S-GRACE"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            assert all(c != "n/a" for c in cells[1:]), line  # every column measured for an erased model
    assert (tmp_path / "docs" / "img" / "benchmark_quick.png").stat().st_size > 1000
    assert not (tmp_path / "RESULTS.md").exists()


def test_sets_mix_objects_and_colours_and_leave_the_development_concepts_out():
    """SETS nest (2 in 4 in 8), mix objects and colours, never hold triangle or blue (another issue's development
    concepts), and in the set's evaluation no near or far prompt asks to keep a member of the set (heart's near
    circle, green's near yellow are members of the 8-set)."""
    import common
    import evaluate

    world = json.loads(common.WORLD_FILE.read_text())
    sizes = sorted(benchmark.SETS)
    assert sizes == [2, 4, 8] and all(len(benchmark.SETS[n]) == n for n in sizes)
    assert all(benchmark.SETS[a] == benchmark.SETS[b][:a] for a, b in zip(sizes, sizes[1:]))
    assert benchmark.SEQUENTIAL == benchmark.SETS[2]
    for members in benchmark.SETS.values():
        assert not {"triangle", "blue"} & set(members)
        assert {c for c in members if c in world["objects"]} and {c for c in members if c in world["colours"]}
    members = benchmark.SETS[8]
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
    body = benchmark.sets_body(rows, 600.0)
    assert "| ESD sequential | 2 | 50.0 [31.4, 68.6] |" in body and "| original model | 2 (n 24/48/100) |" in body
    assert "- UCE: own-word 25 → 50 → 100 % (rises); far 80 → 70 → 50 % (falls)" in body
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nold text\n")
    benchmark.write_section(results, body, benchmark.SETS_SECTION)
    benchmark.write_section(results, "sd table", benchmark.SD_SECTION)
    text = results.read_text()
    assert text.count(benchmark.SETS_SECTION[0]) == 1 and body in text and "old text" in text and "sd table" in text
    assert benchmark.SETS_SECTION in benchmark.KEPT_SECTIONS and benchmark.SD_SECTION in benchmark.KEPT_SECTIONS


def test_closed_form_scale_names_and_peak_memory():
    """100 distinct made-up artists (no comma, so each is one --concept), and VmHWM read from /usr/bin/time -v's
    report in GiB (2097152 kB = 2 GiB); a report without the line gives None."""
    names = benchmark.artist_names(100)
    assert len(set(names)) == 100 and not any("," in n for n in names) and benchmark.artist_names(1) == names[:1]
    report = "\tCommand being timed: \"python uce.py\"\n\tMaximum resident set size (kbytes): 2097152\n"
    assert benchmark.max_rss_gib(report) == 2.0 and benchmark.max_rss_gib("nothing") is None
