"""Several concepts in one erasure (issue 19, docs/concepts.md "Several concepts at once"): the command line and
concept-file lists, the stacked closed forms against torch.linalg.lstsq, {A} through the list path against A
through the single path, and every method end to end on two miniature-world concepts with tiny budgets."""
import json
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import common
import domain_correction
import esd
import realera
import sage
import sgrace
import uce
from test_validation import TINY, refused

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"esd": esd, "uce": uce, "sage": sage, "realera": realera, "domain_correction": domain_correction,
           "sgrace": sgrace}
MONET = ROOT / "concepts" / "examples" / "claude_monet.json"


def run(module, argv: list[str]):
    module.main([*argv, "--device", "cpu"])


def weights(folder) -> dict:
    return load_file(str(Path(folder) / "erased.safetensors"))


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------------------------------
# The command line and the concept file
# ---------------------------------------------------------------------------------------------
def test_repeated_concept_is_a_list_and_one_stays_a_text():
    one = common.parse_args(uce.Args, ["--model", "toy", "--concept", "circle", "--samples", "circle"])
    assert one.concept == "circle" and one.samples == ["circle"]  # a list flag given once stays a list
    two = common.parse_args(uce.Args, ["--model", "toy", "--concept", "circle", "--concept", "red"])
    assert two.concept == ["circle", "red"]
    infos = common.concept_set(two)
    assert [i["name"] for i in infos] == ["circle", "red"] and [i["kind"] for i in infos] == ["object", "colour"]
    assert common.concept_set(one) == [common.concept_info("circle", "toy")]
    assert common.set_name(infos) == "circle+red"
    assert common.set_name([dict(name=f"artist number {i}") for i in range(100)]) == "artist_number_0+99_more"


def test_the_set_leaves_its_members_out_of_near_and_others():
    """Retention and far specificity keep what lies outside the set: red's near 'orange' and the other colours
    stay, but orange is not kept when it is erased too."""
    args = common.parse_args(uce.Args, ["--model", "toy", "--concept", "red", "--concept", "orange"])
    red, orange = common.concept_set(args)
    assert "orange" in common.concept_info("red", "toy")["near"] and "orange" not in red["near"]
    assert "red" not in orange["others"] and "orange" not in red["others"] and "yellow" in red["others"]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_comma_is_still_refused_and_names_the_repeated_flag(name, tmp_path, capsys):
    message = refused(capsys, lambda: run(METHODS[name], ["--model", "toy", "--concept", "circle, red",
                                                          "--output", str(tmp_path / "out")]))
    assert "has a comma" in message and "repeat the flag (--concept 'circle' --concept 'red')" in message
    assert not (tmp_path / "out").exists()


def test_refusals_of_the_set(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert "given twice" in refused(capsys, lambda: run(uce, ["--model", "toy", "--concept", "red", "--concept",
                                                              "Red", "--output", out]))
    assert "--words describes one concept" in refused(capsys, lambda: run(uce, [
        "--model", "toy", "--concept", "red", "--concept", "circle", "--words", "red", "--output", out]))
    assert "--train_method" in refused(capsys, lambda: run(esd, [
        "--model", "toy", "--concept", "red", "--concept", "circle", "--output", out]))
    listed = tmp_path / "set.json"
    listed.write_text(json.dumps([json.loads(MONET.read_text()), json.loads((ROOT / "concepts" / "church.json").read_text())]))
    assert "leave --concept out" in refused(capsys, lambda: run(uce, ["--model", common.SD14, "--concept", "church",
                                                                      "--concept_file", str(listed), "--output", out]))
    twice = tmp_path / "twice.json"
    twice.write_text(json.dumps([json.loads(MONET.read_text())] * 2))
    assert "twice" in refused(capsys, lambda: common.read_concept_files(twice))
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert "non-empty list" in refused(capsys, lambda: common.read_concept_files(empty))
    assert not (tmp_path / "out").exists()


def test_a_comma_in_a_list_files_name_says_split_it_into_entries(tmp_path, capsys):
    """A concept file has no --concept to repeat: its refusal says to give each concept its own entry."""
    listed = tmp_path / "set.json"
    listed.write_text(json.dumps([dict(json.loads(MONET.read_text()), name="claude monet, van gogh")]))
    message = refused(capsys, lambda: common.read_concept_files(listed))
    assert "has a comma" in message and "its own entry in a JSON list" in message and "repeat the flag" not in message


def test_a_list_file_names_its_concepts():
    listed = [json.loads(MONET.read_text()), json.loads((ROOT / "concepts" / "church.json").read_text())]
    path = Path(common.HERE / "outputs" / "test_set.json")
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(listed))
    try:
        args = common.parse_args(uce.Args, ["--model", common.SD14, "--concept_file", str(path)])
        assert args.concept == ["claude monet", "church"]
        monet, church = common.concept_set(args)
        assert monet == dict(common.concept_info(None, common.SD14, concept_file=str(MONET)),
                             others=[c for c in common.concept_info(None, common.SD14, concept_file=str(MONET))["others"]
                                     if c != "church"])
        assert church["kind"] == "object" and "church" not in monet["others"]
    finally:
        path.unlink()


# ---------------------------------------------------------------------------------------------
# The stacked closed forms against an independent solver
# ---------------------------------------------------------------------------------------------
def lstsq_edit(W, keys, values, kept, s_p, lam, s_e=1.0):
    """W* of the stacked least-squares system, solved by torch.linalg.lstsq in float64 (the oracle)."""
    W, keys, values, kept = W.double(), keys.double(), values.double(), kept.double()
    A = torch.cat([s_e ** 0.5 * keys, s_p ** 0.5 * kept, lam ** 0.5 * torch.eye(W.shape[1], dtype=torch.float64)])
    B = torch.cat([s_e ** 0.5 * values, s_p ** 0.5 * kept @ W.T, lam ** 0.5 * W.T])
    return torch.linalg.lstsq(A, B).solution.T


def test_uce_two_concepts_are_one_lstsq_on_the_stacked_system(toy, tmp_path):
    """The edited to_k / to_v of a two-concept UCE run equal lstsq on the two concepts' rows stacked, each row
    built from that concept alone (its own words and guide)."""
    run(uce, ["--model", "toy", "--concept", "circle", "--concept", "red", "--preserve", "square", "blue",
              "--samples", "circle", "--output", str(tmp_path / "uce")])
    edited = weights(tmp_path / "uce")
    args = common.parse_args(uce.Args, ["--model", "toy", "--concept", "circle"])
    rows = [uce.erase_and_guide_keys(toy, *uce.concept_prompts(args, common.concept_info(c, "toy"))[2:], "last")
            for c in ("circle", "red")]
    keys, guides = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
    kept = torch.cat(uce.token_vectors(toy, ["square", "blue"], "last"))
    for name, layer in common.attn2_projections(toy.unet):
        W0 = layer.weight.detach()
        oracle = lstsq_edit(W0, keys, guides.double() @ W0.double().T, kept, 1.0, 0.5)
        torch.testing.assert_close(edited[f"unet.{name}.weight"].double(), oracle, rtol=1e-4, atol=1e-4)


def test_realera_stacked_closed_form_equals_lstsq():
    """RealEra's Eq. 3 on two concepts' keys stacked (with preserved keys weighted alpha) is lstsq's answer."""
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(12, 16, generator=gen)
    keys_a, keys_b, kept = torch.randn(5, 16, generator=gen), torch.randn(7, 16, generator=gen), torch.randn(4, 16, generator=gen)
    anchors_a, anchors_b = torch.randn(5, 16, generator=gen), torch.randn(7, 16, generator=gen)
    keys, values = torch.cat([keys_a, keys_b]), torch.cat([anchors_a, anchors_b]) @ W.T
    for alpha, lam in [(1.0, 0.5), (0.3, 1e-2)]:
        torch.testing.assert_close(realera.closed_form_edit(W, keys, values, kept, alpha, lam).double(),
                                   lstsq_edit(W, keys, values, kept, alpha, lam), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# {A} through the list path = A through the single path
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["uce", "esd"])
def test_a_list_of_one_equals_the_single_concept(name, sd_like_path, tmp_path):
    """A concept file holding the list [monet] erases exactly what the file holding monet alone erases."""
    listed = tmp_path / "one.json"
    listed.write_text(json.dumps([json.loads(MONET.read_text())]))
    budget = ["--iterations", "2", "--ddim_steps", "2", "--samples", "x"] if name == "esd" else ["--samples", "x"]
    for label, path in (("single", MONET), ("list", listed)):
        run(METHODS[name], ["--model", str(sd_like_path), "--concept_file", str(path), *budget,
                            "--output", str(tmp_path / label)])
    assert_same_weights(weights(tmp_path / "single"), weights(tmp_path / "list"))
    single, listed = (json.loads((tmp_path / f / "config.json").read_text()) for f in ("single", "list"))
    assert single["concept"] == listed["concept"] and "concepts" not in listed


# ---------------------------------------------------------------------------------------------
# Every method on two concepts, end to end
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_method_erases_two_concepts(name, tmp_path):
    """Two miniature-world concepts in one run (ESD: two objects, one parameter group; the others an object and
    a colour), tiny budgets: one folder, config.json lists both concepts, and the weights differ from erasing
    the first concept alone."""
    second = "square" if name == "esd" else "red"
    tiny = [t for t in TINY[name].split() if t not in ("--samples", "circle")]
    run(METHODS[name], ["--model", "toy", "--concept", "circle", "--concept", second, *tiny,
                        "--output", str(tmp_path / "set")])
    config = json.loads((tmp_path / "set" / "config.json").read_text())
    assert config["concept"] is None and [c["name"] for c in config["concepts"]] == ["circle", second]
    assert config["args"]["concept"] == ["circle", second]
    run(METHODS[name], ["--model", "toy", "--concept", "circle", *tiny, "--output", str(tmp_path / "one")])
    both, one = weights(tmp_path / "set"), weights(tmp_path / "one")
    assert both and any(not torch.equal(both[k], one[k]) for k in both if k in one)


# ---------------------------------------------------------------------------------------------
# evaluate.py on a set
# ---------------------------------------------------------------------------------------------
def test_set_tables_flag_a_concept_left_un_erased():
    """The not-erased rule by hand: circle 90 % vs original 100 % (margin 20: above 80, flagged), red 10 % vs
    90 % (erased)."""
    import evaluate

    def rows(original, set_rate, alone):
        return [dict(name="original", efficacy=original), dict(name="uce (set)", efficacy=set_rate, far=95.0),
                *[dict(name=f"uce ({a})", efficacy=a_rate) for a, a_rate in alone]]

    results = {"circle": rows(100.0, 90.0, [("circle", 5.0), ("red", 100.0)]),
               "red": rows(90.0, 10.0, [("circle", 85.0), ("red", 0.0)])}
    lines, flags, per_concept = evaluate.set_tables(results, 1, ["circle", "red"], 20.0)
    assert flags == [dict(concept="circle", model="uce (set)", rate=90.0, original=100.0)]
    assert [r["concept"] for r in per_concept] == ["circle", "red"] and per_concept[0]["far"] == 95.0
    assert any(line.startswith("**NOT ERASED: circle") for line in lines)
    assert "| circle | 100 | 90 | 5 | 100 |" in lines and "| red | 90 | 10 | 85 | 0 |" in lines


def test_evaluate_a_set_end_to_end(tmp_path):
    """Two concepts erased by UCE together, and each alone: one evaluation per concept (the other member left out
    of specificity), report.md with the per-concept rows and the cross-concept table."""
    import evaluate

    run(uce, ["--model", "toy", "--concept", "circle", "--concept", "red", "--samples", "x", "--output", str(tmp_path / "set")])
    for c in ("circle", "red"):
        run(uce, ["--model", "toy", "--concept", c, "--samples", "x", "--output", str(tmp_path / c)])
    tiny = "--seeds 1 --far_seeds 1 --steps 2 --attack none".split()
    results = evaluate.main(["--model", "toy", "--concept", "circle", "--concept", "red", "--erased", str(tmp_path / "set"),
                             "--alone", str(tmp_path / "circle"), str(tmp_path / "red"), *tiny, "--device", "cpu",
                             "--output", str(tmp_path / "eval")])
    assert list(results) == ["circle", "red"] and all(len(rows) == 4 for rows in results.values())
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "## Cross-concept table" in report and "| circle | " in report and "red alone" in report
    far = json.loads((tmp_path / "eval" / "circle" / "metrics.json").read_text())["prompts"]["far"]
    assert far and not any("red" in item["prompt"].split() for item in far)  # red is erased too: not a far concept
    assert json.loads((tmp_path / "eval" / "set_metrics.json").read_text())["concepts"] == ["circle", "red"]


# ---------------------------------------------------------------------------------------------
# Sequential runs: --start_from
# ---------------------------------------------------------------------------------------------
def test_merge_start_by_hand(tmp_path):
    """merge_start on a start model of two tensors and a run that changed one of them and one other: the untouched
    start tensor is kept bit for bit, the shared one is the new run's, the new one is added."""
    from safetensors.torch import save_file

    start = {"unet.a": torch.tensor([1.0, 2.0]), "unet.b": torch.tensor([3.0])}
    (tmp_path / "start").mkdir()
    save_file(start, tmp_path / "start" / "erased.safetensors")
    info = dict(folder=tmp_path / "start", base_values={k: torch.zeros_like(v) for k, v in start.items()},
                config=dict(method="uce", concept=dict(name="circle")))
    new = {"unet.b": torch.tensor([7.0]), "text_encoder.c": torch.tensor([5.0])}
    merged, record = common.merge_start(info, new)
    assert sorted(merged) == ["text_encoder.c", "unet.a", "unet.b"]
    assert torch.equal(merged["unet.a"], start["unet.a"]) and merged["unet.b"].item() == 7.0
    assert record["kept_tensors"] == 1 and record["replaced_tensors"] == 1 and record["method"] == "uce"
    assert common.erased_concepts(dict(start_from=record, erased_concepts=["circle", "red"])) == ["circle", "red"]
    assert common.erased_concepts(dict(concept=None, concepts=[dict(name="a"), dict(name="b")])) == ["a", "b"]
    assert common.erased_concepts(dict(erased_concepts=["circle", "red", "circle"])) == ["circle", "red"]


def test_erasing_again_what_the_start_model_erased_is_said(tmp_path, capsys):
    """--start_from a model that already erased circle, erasing circle again: allowed, with a one-line note."""
    from safetensors.torch import save_file

    (tmp_path / "start").mkdir()
    save_file({"unet.a": torch.zeros(1)}, tmp_path / "start" / "erased.safetensors")
    (tmp_path / "start" / "config.json").write_text(json.dumps(dict(
        format=common.FORMAT, base_model="toy", method="uce", concept=dict(name="circle"))))
    args = types.SimpleNamespace(start_from=str(tmp_path / "start"), output=None)
    common.erased_output("uce", [dict(name="red")], args)
    assert "already erased" not in capsys.readouterr().err
    common.erased_output("uce", [dict(name="circle"), dict(name="red")], args)
    assert "already erased circle; this run erases it again" in capsys.readouterr().err


def test_a_sequential_run_keeps_the_first_erasure_and_loads(tmp_path):
    """SAGE erases circle (text-encoder tensors), then UCE erases red from that model (U-Net tensors): the saved
    model holds both, SAGE's bit for bit; UCE's edit was computed on the start model (its keys come through SAGE's
    text encoder, so they differ from UCE on the base); the model loads onto the plain base (its fingerprint is the
    base's) and evaluates as the set {circle, red}. Then UCE after UCE: the second run's tensors replace the
    first's."""
    import evaluate

    sage_tiny = [t for t in TINY["sage"].split() if t not in ("--samples", "circle")]
    run(sage, ["--model", "toy", "--concept", "circle", *sage_tiny, "--samples", "x", "--output", str(tmp_path / "first")])
    run(uce, ["--model", "toy", "--concept", "red", "--samples", "x", "--start_from", str(tmp_path / "first"),
              "--output", str(tmp_path / "then")])
    run(uce, ["--model", "toy", "--concept", "red", "--samples", "x", "--output", str(tmp_path / "red")])
    first, then, alone = weights(tmp_path / "first"), weights(tmp_path / "then"), weights(tmp_path / "red")
    assert first and set(then) == set(first) | set(alone)
    assert all(torch.equal(then[k], first[k]) for k in first)  # kept bit for bit
    assert any(not torch.equal(then[k], alone[k]) for k in alone)  # UCE ran on the start model
    config = json.loads((tmp_path / "then" / "config.json").read_text())
    assert config["start_from"]["path"] == str((tmp_path / "first").resolve())
    assert config["start_from"]["concept"]["name"] == "circle" and config["erased_concepts"] == ["circle", "red"]
    assert config["start_from"]["kept_tensors"] == len(first) and config["concept"]["name"] == "red"
    pipe = common.load_pipeline("toy", erased=tmp_path / "then", device="cpu")  # fingerprint of the plain base
    assert all(torch.equal(common.named_part(pipe, k), v) for k, v in then.items())
    results = evaluate.main(["--model", "toy", "--concept", "circle", "--concept", "red", "--erased",
                             str(tmp_path / "then"), *"--seeds 1 --far_seeds 1 --steps 2 --attack none".split(),
                             "--device", "cpu", "--output", str(tmp_path / "eval")])
    assert list(results) == ["circle", "red"] and all(len(rows) == 2 for rows in results.values())

    run(uce, ["--model", "toy", "--concept", "circle", "--samples", "x", "--output", str(tmp_path / "uce1")])
    run(uce, ["--model", "toy", "--concept", "red", "--samples", "x", "--start_from", str(tmp_path / "uce1"),
              "--output", str(tmp_path / "uce2")])
    one, two = weights(tmp_path / "uce1"), weights(tmp_path / "uce2")
    assert set(one) == set(two) and all(not torch.equal(one[k], two[k]) for k in one)
    assert json.loads((tmp_path / "uce2" / "config.json").read_text())["start_from"]["replaced_tensors"] == len(one)


def test_a_start_model_of_another_base_is_refused(tmp_path, sd_like_path, capsys):
    """A start model erased from the miniature model, given to a run on another base: one sentence, nothing
    written; and a folder that is not an erased model is refused before anything loads."""
    run(uce, ["--model", "toy", "--concept", "circle", "--samples", "x", "--output", str(tmp_path / "toy")])
    message = refused(capsys, lambda: run(uce, ["--model", str(sd_like_path), "--concept", "circle", "--kind",
                                                "object", "--start_from", str(tmp_path / "toy"), "--samples", "x",
                                                "--output", str(tmp_path / "out")]))
    assert "erased from 'toy'" in message and not (tmp_path / "out").exists()
    message = refused(capsys, lambda: run(uce, ["--model", "toy", "--concept", "red", "--start_from", str(tmp_path)]))
    assert "is not an erased model" in message
    before = (tmp_path / "toy" / "erased.safetensors").read_bytes()
    message = refused(capsys, lambda: run(uce, ["--model", "toy", "--concept", "red", "--start_from", str(tmp_path / "toy"),
                                                "--output", str(tmp_path / "toy")]))
    assert "is the --start_from model" in message
    assert (tmp_path / "toy" / "erased.safetensors").read_bytes() == before  # the start model is untouched
