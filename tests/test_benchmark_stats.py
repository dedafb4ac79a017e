"""benchmark.py's statistics without running a model: seed summaries against a hand computation, the rule for
calling a difference, the budget rule, the claims' verdicts, marked sections, and that every ablation flag exists."""
import math

import pytest

import benchmark
import common


def wilson(k, n, z=1.959963984540054):
    """The Wilson score interval in %, written out again (the oracle for evaluate.wilson_interval's use)."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(100 * max(0, centre - half), 1), round(100 * min(1, centre + half), 1)]


def row(k_own, n_own, seconds):
    return {"counts": {"efficacy": [k_own, n_own]}, "seconds": seconds}


def test_summarize_matches_hand_computation():
    seeds = [[row(6, 24, 50.0)], [row(9, 24, 54.0)], [row(3, 24, 58.0)]]
    s = benchmark.summarize(seeds)
    rates = [25.0, 37.5, 12.5]
    mean = sum(rates) / 3
    sd = math.sqrt(sum((r - mean) ** 2 for r in rates) / 2)
    assert s["n_seeds"] == 3
    assert s["efficacy"]["mean"] == pytest.approx(mean) and s["efficacy"]["sd"] == pytest.approx(sd)
    assert s["efficacy"]["counts"] == [18, 72] and s["efficacy"]["ci95"] == wilson(18, 72)
    assert s["seconds"]["mean"] == pytest.approx(54.0) and s["seconds"]["sd"] == pytest.approx(4.0)
    assert "ci95" not in s["seconds"]
    # across concepts: a seed's value is the mean over its concepts; the interval pools every image
    both = benchmark.summarize([[row(6, 24, 1.0), row(12, 48, 3.0)], [row(0, 24, 1.0), row(24, 48, 3.0)]])
    assert both["efficacy"]["values"] == pytest.approx([25.0, 25.0]) and both["efficacy"]["sd"] == 0
    assert both["efficacy"]["counts"] == [42, 144] and both["efficacy"]["ci95"] == wilson(42, 144)
    # one seed: no sd (a seeded method) or 0 (a method without randomness)
    assert benchmark.summarize(seeds[:1])["efficacy"]["sd"] is None
    assert benchmark.summarize(seeds[:1], deterministic=True)["efficacy"]["sd"] == 0.0


def entry(mean, sd, ci=None):
    return dict(mean=mean, sd=sd, **({"ci95": ci} if ci else {}))


def test_a_difference_needs_both_clauses():
    assert benchmark.separated(entry(10, 2, [5, 15]), entry(40, 3, [33, 47])) is True
    assert benchmark.separated(entry(10, 2, [5, 30]), entry(40, 3, [29, 47])) is False  # intervals overlap
    assert benchmark.separated(entry(10, 15, [5, 15]), entry(40, 16, [33, 47])) is False  # seeds spread too wide
    assert benchmark.separated(entry(10, None, [5, 15]), entry(40, 3, [33, 47])) is None  # one seed: unknown sd
    assert benchmark.separated(entry(10, 1), entry(13, 1)) is True  # seconds: clause (2) alone
    rows = [("A", {"efficacy": entry(10, 2, [5, 15])}), ("B", {"efficacy": entry(40, 3, [33, 47])}),
            ("C", {"efficacy": entry(12, 2, [6, 20])})]
    lines = benchmark.differences(rows, keys=[("efficacy", "own-word rate")])
    assert lines == ["- own-word rate: A < B; C < B"]
    assert benchmark.seed_cell(entry(12.345, 1.5, [6, 20]), "efficacy") == "12.3 ± 1.5 [6, 20]"
    assert benchmark.seed_cell(entry(12.345, None, [6, 20]), "efficacy") == "12.3 [6, 20]"


def point(rates, far, original_far, cpu):
    return {"point": {"x": rates}, "concepts": {c: dict(efficacy=r, generality=r, far=f, original_far=o, cpu_seconds=s)
                                                 for c, r, f, o, s in zip("ab", rates, far, original_far, cpu)}}


def test_budget_rule():
    cheap_good = point([10, 20], [90, 88], [91, 90], [50, 50])
    better_but_slow = point([0, 0], [91, 90], [91, 90], [130, 50])  # over the CPU cap on one concept
    better_but_far = point([5, 5], [91, 86], [91, 90], [50, 50])  # 4 points of far lost on b
    tie_dearer = point([20, 10], [91, 90], [91, 90], [60, 60])  # same mean rate as cheap_good, more CPU
    chosen = benchmark.choose_budget([better_but_slow, better_but_far, tie_dearer, cheap_good])
    assert chosen["point"] == cheap_good["point"] and chosen["qualified"]
    fallback = benchmark.choose_budget([better_but_slow, better_but_far])  # nothing qualifies: best far in the cap
    assert fallback["point"] == better_but_far["point"] and not fallback["qualified"]


def test_claim_verdicts():
    good, bad = entry(10, 1, [5, 15]), entry(60, 1, [50, 70])
    assert benchmark.claim_verdict({"generality": good}, {"generality": bad}, ["generality"], "all")[0] == "holds"
    assert benchmark.claim_verdict({"generality": bad}, {"generality": good}, ["generality"], "all")[0] == "does not hold"
    near_kept = {"near": entry(90, 1, [85, 95]), "far": entry(90, 1, [85, 95])}
    near_lost = {"near": entry(50, 1, [45, 55]), "far": entry(89, 1, [84, 94])}
    assert benchmark.claim_verdict(near_kept, near_lost, ["near", "far"], "any") == ("holds", ["holds", "not separable"])
    assert benchmark.claim_verdict(near_kept, near_lost, ["near", "far"], "all")[0] == "not separable"


def test_every_marked_section_is_found_and_replaced():
    text = ("# R\n\n<!-- sd-scale: by x -->\nA\n<!-- /sd-scale -->\n\ntext\n<!-- sets: by y -->\nB\n<!-- /sets -->\n")
    sections = benchmark.marked_sections(text)
    assert list(sections) == ["sd-scale", "sets"] and sections["sets"] == "<!-- sets: by y -->\nB\n<!-- /sets -->"
    new = benchmark.replace_marked(text, "sets", "<!-- sets -->\nC\n<!-- /sets -->")
    assert "C" in new and "B" not in new and "A" in new
    assert benchmark.replace_marked("# R\n", "claims", "<!-- claims -->\nD\n<!-- /claims -->").endswith("D\n<!-- /claims -->\n")


@pytest.mark.parametrize("method", list(benchmark.CLAIM_VARIANTS))
def test_every_ablation_flag_exists(method):
    module = __import__(method)
    for flags in benchmark.CLAIM_VARIANTS[method].values():
        args = common.parse_args(module.Args, ["--model", "toy", "--concept", "circle", *flags],
                                 toy_defaults=module.TOY_DEFAULTS, limits=module.LIMITS)
        assert args != common.parse_args(module.Args, ["--model", "toy", "--concept", "circle"],
                                         toy_defaults=module.TOY_DEFAULTS, limits=module.LIMITS)


@pytest.mark.parametrize("method", list(benchmark.BUDGET_GRIDS))
def test_every_grid_point_is_a_valid_setting(method):
    module = __import__(method)
    points = benchmark.grid_points(benchmark.BUDGET_GRIDS[method])
    assert 4 <= len(points) <= 6
    for p in points:
        args = common.parse_args(module.Args, ["--model", "toy", "--concept", "triangle", *benchmark.point_flags(p)],
                                 toy_defaults=getattr(module, "TOY_DEFAULTS", None), limits=module.LIMITS)
        assert all(getattr(args, k) == v for k, v in p.items())


def test_new_flags_refuse_mistakes_in_one_sentence(tmp_path, capsys):
    from conftest import refused

    out = ["--output", str(tmp_path / "out")]
    assert "separate runs" in refused(capsys, lambda: benchmark.main(["--select_budgets", "--claims", *out]))
    assert "erasure_seeds" in refused(capsys, lambda: benchmark.main(["--erasure_seeds", "0", *out]))
    assert "jobs" in refused(capsys, lambda: benchmark.main(["--jobs", "0", *out]))
    assert "reported by the benchmark" in refused(
        capsys, lambda: benchmark.main(["--select_budgets", "--dev_concepts", "triangle", "circle", *out]))
    assert "no claim" in refused(capsys, lambda: benchmark.main(["--claims", "--methods", "esd", "uce", *out]))
    refused(capsys, lambda: benchmark.main(["--claims", "--claim_concepts", "nonesuch", *out]))
    assert not (tmp_path / "out").exists()


def test_jobs_run_after_what_they_wait_for():
    order = []
    jobs = [dict(name="a", run=lambda: order.append("a")), dict(name="b", run=lambda: order.append("b")),
            dict(name="eval", after=["a", "b"], first=True, run=lambda: order.append("eval")),
            dict(name="c", run=lambda: order.append("c"))]
    benchmark.run_jobs(jobs, 1)
    assert order == ["a", "b", "eval", "c"]  # ready evaluations go first


def test_doco_mse_ablation_gets_as_many_unet_updates():
    import domain_correction

    full = domain_correction.TOY_DEFAULTS["iterations"] - domain_correction.TOY_DEFAULTS["warm_up"]
    assert benchmark.same_unet_updates(False) == ["--iterations", str(full)]
    assert benchmark.same_unet_updates(True) == ["--iterations", "30"]  # QUICK: 40 iterations, 10 of warm-up
    args = common.parse_args(benchmark.Args, ["--claims", "--quick", "--erasure_seeds", "1"])
    plan = benchmark.claims_plan(args, benchmark.Path("w"), 1, benchmark.CLAIMS)
    mse = next(r for r in plan["circle"] if r[0] == "domain_correction_mse")
    assert mse[4][-4:] == ["--iterations", "30", "--seed", "42"] and "--unlearn_loss" in mse[4]


def test_parts_share_one_pool_and_keep_their_own_metrics(tmp_path, monkeypatch):
    """erase_and_evaluate_parts: with 2 jobs, the second part's erasure runs while the first part's evaluation does
    (one pool, no idle core), and each part gets back the metrics of its own evaluation (prefix and flags)."""
    import threading
    import time as clock
    from types import SimpleNamespace

    events, lock = [], threading.Lock()

    def log(*event):
        with lock:
            events.append(event)

    def fake_erasure(method, concept, folder, extra):
        log("erase start", folder.name)
        clock.sleep(0.2)
        log("erase end", folder.name)
        return {"wall_seconds": 0.2, "cpu_seconds": 0.2}

    def fake_evaluation(concept, folders, out, extra, resume):
        log("eval start", out.name)
        clock.sleep(0.5)
        log("eval end", out.name)
        return {"evaluation_seconds": 0.5, "out": out.name, "extra": extra, "folders": [f.name for f in folders]}

    monkeypatch.setattr(benchmark, "run_erasure", fake_erasure)
    monkeypatch.setattr(benchmark, "evaluate_folders", fake_evaluation)
    first = {"circle": [("a", "a", 0, tmp_path / "a-circle", [])]}
    second = {"circle": [("b", "b", 0, tmp_path / "b-circle", [])]}
    args = SimpleNamespace(reuse=False, jobs=2)
    one, two = benchmark.erase_and_evaluate_parts([(first, ["--attack", "both"], "eval-x"),
                                                   (second, ["--attack", "none"], "eval-y")], tmp_path, args)
    assert one["circle"]["out"] == "eval-x-circle" and one["circle"]["extra"] == ["--attack", "both"]
    assert two["circle"]["out"] == "eval-y-circle" and two["circle"]["folders"] == ["b-circle"]
    order = [e[0] + " " + e[1] for e in events]
    # each evaluation after its own erasure; the two parts overlap in time
    assert order.index("eval start eval-x-circle") > order.index("erase end a-circle")
    assert order.index("eval start eval-y-circle") > order.index("erase end b-circle")
    assert order.index("erase start b-circle") < order.index("eval end eval-x-circle")
