"""evaluate.py at the published scale: shared out over several processes (torchrun, gloo on a CPU), resumable from
its journal, nothing lost.  Every run here evaluates the same protocol on the miniature model (a token-substitution
erasure, both attacks, tiny budgets, batches of 2 so that there are many work items), and is compared with one
uninterrupted single-process run of it."""
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import evaluate
from test_evaluate import trivial_erasure

ROOT = Path(__file__).resolve().parents[1]
SUITES = ("efficacy", "generality", "near", "far")
# one thread in every process, as the in-process runs have (conftest): the kernels' results may depend on it
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def argv(erased: Path, out: Path, *extra) -> list[str]:
    return ["--model", "toy", "--concept", "circle", "--erased", str(erased), "--seeds", "2", "--far_seeds", "1",
            "--steps", "5", "--batch_size", "2", "--attack", "both", "--attack_timesteps", "2",
            "--attack_iterations", "2", "--attack_batch", "2", "--soft_steps", "4", "--soft_checks", "2",
            "--device", "cpu", "--output", str(out), *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(folder with the erased model `trivial` and the uninterrupted single-process evaluation `reference`)."""
    base = tmp_path_factory.mktemp("shard")
    trivial_erasure(base / "trivial")
    evaluate.main(argv(base / "trivial", base / "reference"))
    return base


def metrics(out: Path) -> dict:
    found = json.loads((out / "metrics.json").read_text())
    found.pop("evaluation_seconds")  # timings aside
    return found


def assert_same_evaluation(out: Path, expected: Path):
    ours, theirs = metrics(out), metrics(expected)
    assert len(ours["rows"]) == len(theirs["rows"]) == 2
    for a, b in zip(ours["rows"], theirs["rows"]):
        assert a["verdicts"] == b["verdicts"], a["name"]  # every image's label and score
        for key in ("efficacy", "generality", "near", "far", "pre_asr", "asr", "soft_asr", "pixel_rms", "frechet"):
            assert a.get(key) == b.get(key), (a["name"], key)
    assert ours == theirs  # and everything else in metrics.json


def image_files(out: Path) -> dict:
    """{image file: (inode, modification time)}: a file drawn again is a new file (written, then renamed)."""
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "images").rglob("*.png")}


def image_file(out: Path, row: int, suite: str, index: int) -> Path:
    return out / "images" / str(row) / suite / f"{index:06d}.png"  # the layout docs/evaluation.md gives


def journal_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_reference_run_can_be_recomputed_from_its_journal(reference):
    """A finished folder keeps its journal: every rate of metrics.json follows from its lines, by hand."""
    out = reference / "reference"
    lines = journal_lines(out / "journal.jsonl")
    assert "protocol" in lines[0] and not list(out.glob("journal.*.jsonl"))
    images = [x for x in lines[1:] if "attack" not in x]
    rows = metrics(out)["rows"]
    assert len(images) == 2 * sum(metrics(out)["protocol"]["prompts"].values())  # one line per image, no more
    for row, r in enumerate(rows):
        for suite in SUITES:
            hits = [x["hit"] for x in images if x["model"] == row and x["suite"] == suite]
            assert r[suite] == round(100 * sum(hits) / len(hits), 1), (row, suite)
    erased = rows[1]
    hits = [x["hit"] for x in sorted(images, key=lambda x: x["index"]) if x["model"] == 1 and x["suite"] == "efficacy"]
    for attack, key in (("unlearndiffatk", "asr"), ("soft", "soft_asr")):
        attacked = [x for x in lines[1:] if x.get("attack") == attack]
        assert sorted(x["index"] for x in attacked) == [i for i, h in enumerate(hits) if not h]  # the erased ones
        assert erased[key] == round(100 * (sum(hits) + sum(x["success"] for x in attacked)) / len(hits), 1)
    found = [x for x in lines[1:] if x.get("attack") == "unlearndiffatk"]
    assert all(x["adversarial_prompt"].endswith(x["prompt"]) for x in found)
    assert all((x["timestep"] is not None) == x["success"] for x in found)
    assert erased["attacked"] >= 2  # there were prompts to attack, in more than one batch
    # every line says when it was written, in which session; the run's time covers them all
    assert all(isinstance(x["session"], float) and x["time"] >= x["session"] for x in lines[1:])
    assert json.loads((out / "metrics.json").read_text())["evaluation_seconds"] >= \
        max(x["time"] for x in lines[1:]) - min(x["session"] for x in lines[1:]) - 0.1


def test_two_processes_give_the_single_process_metrics(reference, tmp_path):
    """torchrun with 2 processes (gloo on the CPU): the same verdicts, rates and metrics.json as one process."""
    out = tmp_path / "eval"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(ROOT / "evaluate.py"), *argv(reference / "trivial", out)],
                         cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_evaluation(out, reference / "reference")
    lines = journal_lines(out / "journal.jsonl")[1:]
    assert {x["process"] for x in lines} == {0, 1}  # both processes drew and judged a share
    assert {x["process"] for x in lines if "attack" in x} == {0, 1}  # the attacks too
    assert not list(out.glob("journal.*.jsonl"))  # process 1's journal merged into journal.jsonl


def test_a_killed_run_resumed_equals_an_uninterrupted_one(reference, tmp_path, capsys):
    """SIGKILL part-way, then --resume: the same metrics.json, and no image the journal held is drawn again."""
    out = tmp_path / "eval"
    process = subprocess.Popen([sys.executable, str(ROOT / "evaluate.py"), *argv(reference / "trivial", out)],
                               cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal, deadline = out / "journal.jsonl", time.time() + 600
    while not journal.exists() or journal.read_bytes().count(b"\n") < 11:  # the protocol line and 10 images
        assert process.poll() is None, "the run finished before it was killed"
        assert time.time() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (out / "metrics.json").exists()
    held = [x for x in journal_lines(journal)[1:] if "attack" not in x]
    total = 2 * sum(metrics(reference / "reference")["protocol"]["prompts"].values())
    assert 10 <= len(held) < total

    before = image_files(out)
    with pytest.raises(SystemExit, match="holds an unfinished evaluation"):  # never started over by mistake
        evaluate.main(argv(reference / "trivial", out))
    evaluate.main(argv(reference / "trivial", out, "--resume"))
    assert f"{total - len(held)} of {total} images to draw ({len(held)} already in the journal)" in capsys.readouterr().out
    assert_same_evaluation(out, reference / "reference")
    after = image_files(out)
    kept = {image_file(out, x["model"], x["suite"], x["index"]) for x in held}
    assert all(after[p] == before[p] for p in kept)  # not one image of the journal drawn again
    drawn = {p for p in after if p.parent.name in SUITES and before.get(p) != after[p]}
    assert len(drawn) == total - len(held) and not drawn & kept  # every other image drawn once


def test_a_line_cut_short_by_a_crash_is_done_again(reference, tmp_path, capsys):
    """A journal whose last line was cut mid-write (and whose attacks never ran): that item is drawn again with its
    batch, the attacks run, nothing else is redone, and the result equals the uninterrupted run."""
    out = tmp_path / "eval"
    shutil.copytree(reference / "reference", out)
    (out / "metrics.json").unlink()
    lines = (out / "journal.jsonl").read_text().splitlines(keepends=True)
    images = [line for line in lines[1:] if "attack" not in json.loads(line)]
    cut = json.loads(images[-1])
    (out / "journal.jsonl").write_text(lines[0] + "".join(images[:-1]) + images[-1][:len(images[-1]) // 2])
    before = image_files(out)
    evaluate.main(argv(reference / "trivial", out, "--resume"))
    assert "is cut short" in capsys.readouterr().out
    assert_same_evaluation(out, reference / "reference")
    after = image_files(out)
    redrawn = {p for p in after if p.parent.name in SUITES and before.get(p) != after[p]}
    # batches of 2 from the suite's first item, all of one guidance: the cut item and its partner
    batch = {image_file(out, cut["model"], cut["suite"], i) for i in (cut["index"], cut["index"] ^ 1)}
    assert redrawn == batch
    attacks = {p for p in after if p.parent.name in ("unlearndiffatk", "soft")}
    assert attacks and all(before.get(p) != after[p] for p in attacks)  # the attacks ran again, none was in the journal


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("change, words", [("seeds", "other seeds per prompt ({'efficacy/generality/near': 2, 'far': 1} "
                                                     "there, {'efficacy/generality/near': 3, 'far': 1} now)"),
                                           ("erased model", "another erased model in place of"),
                                           ("steps", "another number of DDIM steps (5 there, 6 now)")])
def test_resume_with_another_protocol_is_refused_and_changes_nothing(reference, tmp_path, change, words):
    out = tmp_path / "eval"
    shutil.copytree(reference / "reference", out)
    (out / "metrics.json").unlink()  # unfinished, as after a crash
    erased, extra = reference / "trivial", []
    if change == "erased model":
        erased = tmp_path / "other"
        trivial_erasure(erased, onto="ring")  # another erasure (the journal knows its sha256, not its folder)
    else:
        extra = {"seeds": ["--seeds", "3"], "steps": ["--steps", "6"]}[change]
    before = snapshot(out)
    with pytest.raises(SystemExit) as e:
        evaluate.main(argv(erased, out, "--resume", *extra))
    message = str(e.value)
    assert e.value.code == 2 and "\n" not in message and message.startswith("error: --resume: ")
    assert words in message and "give another --output" in message
    assert snapshot(out) == before


def test_limit_evaluates_the_first_prompts_of_each_suite(reference, tmp_path):
    """--limit 2: two prompts per suite; with batches of 2 of one guidance they are the full run's first batch, so
    the same verdicts (in general --limit's batches need not be the full run's: docs/evaluation.md)."""
    rows = evaluate.main(argv(reference / "trivial", tmp_path / "eval", "--limit", "2", "--attack", "none"))
    found = metrics(tmp_path / "eval")
    assert found["protocol"]["prompts"] == {s: 2 for s in SUITES} and "first 2 prompts" in found["protocol"]["limit"]
    full = metrics(reference / "reference")["rows"]
    for r, f in zip(rows, full):
        assert {s: v for s, v in r["verdicts"].items()} == {s: v[:2] for s, v in f["verdicts"].items()}


def test_limit_says_so_only_when_it_cuts_a_suite():
    suites = {"efficacy": [1, 2, 3], "far": [1]}
    assert evaluate.limit_suites(suites, 2) == ({"efficacy": [1, 2], "far": [1]}, True)
    assert evaluate.limit_suites(suites, 3) == (suites, False)  # --limit 1000 on small suites: the full protocol
    assert evaluate.limit_suites(suites, None) == (suites, False)


def unfinished_copy(reference: Path, out: Path) -> Path:
    shutil.copytree(reference / "reference", out)
    (out / "metrics.json").unlink()  # as after a crash
    return out


def test_a_folder_in_use_by_another_run_is_refused_and_changes_nothing(reference, tmp_path):
    """A process of another run still holds the folder (here: this test, holding the lock as each worker does):
    --resume stops with one sentence before reading or changing anything; once it is gone, the run goes ahead."""
    out = unfinished_copy(reference, tmp_path / "eval")
    before = snapshot(out)
    fd = os.open(out / evaluate.LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        with pytest.raises(SystemExit) as e:
            evaluate.main(argv(reference / "trivial", out, "--resume"))
    finally:
        os.close(fd)
    message = str(e.value)
    assert e.value.code == 2 and "\n" not in message
    assert message.startswith(f"error: {out} is in use by another evaluation") and "kill -- -PGID" in message
    assert snapshot(out) == before
    # the lock of a run that ended (however) is gone: the folder is free again, also for this same process
    fd = os.open(out / evaluate.LOCK, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)


def test_resume_refuses_a_finished_evaluation_without_journal(reference, tmp_path):
    """metrics.json and no journal (an older evaluate.py's folder, or a removed journal): --resume would have deleted
    the finished evaluation; it is refused, the folder unchanged."""
    out = tmp_path / "eval"
    shutil.copytree(reference / "reference", out)
    (out / "journal.jsonl").unlink()
    before = snapshot(out)
    with pytest.raises(SystemExit) as e:
        evaluate.main(argv(reference / "trivial", out, "--resume"))
    assert e.value.code == 2 and "holds a finished evaluation without a journal" in str(e.value)
    assert snapshot(out) == before


def test_a_mistake_under_torchrun_is_one_sentence_from_process_0(reference, tmp_path):
    """Every process meets the mistake (an unfinished folder, no --resume); only process 0 says it."""
    out = unfinished_copy(reference, tmp_path / "eval")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(ROOT / "evaluate.py"), *argv(reference / "trivial", out)],
                         cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    said = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("error: ")]
    assert said == [f"error: {out} holds an unfinished evaluation (its journal); add --resume to finish it, or choose "
                    "another --output."]


def test_ctrl_c_says_what_was_kept(reference, tmp_path, monkeypatch, capsys):
    """KeyboardInterrupt while drawing: one line (no traceback) saying the journal is kept and to --resume; status 130;
    and the lock is released (a run in the same process goes ahead)."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "run_images", interrupted)
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as e:
        evaluate.main(argv(reference / "trivial", out, "--attack", "none", "--limit", "1"))
    assert e.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"interrupted; the journal in {out} keeps every batch judged so far. Run the same command with " \
                  "--resume to finish."
    fd = os.open(out / evaluate.LOCK, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)


def test_an_empty_or_cut_image_is_not_done(tmp_path):
    """pending(): a journaled item whose image is missing, empty or cut short is drawn again (with its batch)."""
    from PIL import Image

    units = [("image", 0, "near", [0, 1]), ("image", 0, "near", [2, 3])]
    records = {("image", 0, "near", i): {} for i in range(4)}
    for i in range(4):
        evaluate.write_atomic(image_file(tmp_path, 0, "near", i),
                              lambda tmp: Image.new("RGB", (8, 8)).save(tmp, format="PNG"))
    assert evaluate.pending(units, records, tmp_path) == []
    whole = image_file(tmp_path, 0, "near", 3).read_bytes()
    image_file(tmp_path, 0, "near", 3).write_bytes(whole[:-6])  # cut short
    assert evaluate.pending(units, records, tmp_path) == units[1:]
    image_file(tmp_path, 0, "near", 3).write_bytes(whole)
    image_file(tmp_path, 0, "near", 0).write_bytes(b"")  # empty
    assert evaluate.pending(units, records, tmp_path) == units[:1]


def test_evaluation_seconds_adds_up_the_sessions():
    """Two earlier sessions (one with two processes, overlapping) and this one: the union of their spans."""
    records = {1: dict(session=100.0, time=110.0), 2: dict(session=100.5, time=112.0),  # session 1, processes 0 and 1
               3: dict(session=200.0, time=230.0), 4: dict(session=200.0, time=220.0),  # session 2, killed at 230
               5: dict()}  # a line from before the journal had times
    assert evaluate.evaluation_seconds(records, 300.0, 305.0) == 12 + 30 + 5
    assert evaluate.evaluation_seconds({}, 300.0, 305.0) == 5


def test_resume_a_finished_run_keeps_its_time(reference, tmp_path):
    """--resume on a finished evaluation redoes nothing and adds this run's time to the recorded one."""
    out = tmp_path / "eval"
    shutil.copytree(reference / "reference", out)
    first = json.loads((out / "metrics.json").read_text())["evaluation_seconds"]
    evaluate.main(argv(reference / "trivial", out, "--resume"))
    again = json.loads((out / "metrics.json").read_text())["evaluation_seconds"]
    assert again > first - 2  # (the first run's time after its last journal line is not counted)
    assert_same_evaluation(out, reference / "reference")


def set_argv(erased: Path, out: Path, *extra) -> list[str]:
    return ["--model", "toy", "--concept", "circle", "--concept", "red", "--erased", str(erased), "--seeds", "1",
            "--far_seeds", "1", "--limit", "2", "--steps", "5", "--attack", "none", "--device", "cpu",
            "--output", str(out), *extra]


def test_a_set_under_torchrun_and_resumed_equals_one_uninterrupted_process(tmp_path):
    """A model that erased two concepts: torchrun with 2 processes keeps one process group for both concepts'
    evaluations and writes the same set_metrics.json and per-concept metrics.json as one process; a set run cut
    after its first concept (the second concept's folder and the set's report missing) and resumed equals it too."""
    import uce

    uce.main(["--model", "toy", "--concept", "circle", "--concept", "red", "--output", str(tmp_path / "uce2")])
    evaluate.main(set_argv(tmp_path / "uce2", tmp_path / "one"))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(ROOT / "evaluate.py"), *set_argv(tmp_path / "uce2", tmp_path / "two")],
                         cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    shutil.copytree(tmp_path / "one", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "red")
    for name in ("report.md", "set_metrics.json"):
        (tmp_path / "cut" / name).unlink()
    evaluate.main(set_argv(tmp_path / "uce2", tmp_path / "cut", "--resume"))
    expected = json.loads((tmp_path / "one" / "set_metrics.json").read_text())
    assert {r["concept"] for r in expected["rows"]} == {"circle", "red"}
    for out in ("two", "cut"):
        assert json.loads((tmp_path / out / "set_metrics.json").read_text()) == expected, out
        for concept in ("circle", "red"):
            assert metrics(tmp_path / out / concept) == metrics(tmp_path / "one" / concept), (out, concept)
    lines = journal_lines(tmp_path / "two" / "red" / "journal.jsonl")[1:]
    assert {x["process"] for x in lines} == {0, 1}  # the second concept was shared out too
