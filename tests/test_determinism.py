"""A rerun on the same machine in the benchmark's process configuration (one torch thread per process, as
common.load_pipeline sets for the miniature model) is bit-identical: the erased weights and every number of the
evaluation (docs/evaluation.md, "Determinism")."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *flags):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # common.load_pipeline's one thread
    done = subprocess.run([sys.executable, str(ROOT / script), *map(str, flags)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_rerun_is_bit_identical(tmp_path):
    # lr 1e-3 erases circle in 3 steps (measured: 0 of 3 own-word images), so the attacks have prompts to attack;
    # at the toy default lr (1e-4) nothing is erased, and an attack that never runs would compare nothing
    esd = ["--model", "toy", "--concept", "circle", "--iterations", "3", "--ddim_steps", "3", "--sample_steps", "2",
           "--lr", "1e-3"]
    run("esd.py", *esd, "--output", tmp_path / "esd-a")
    run("esd.py", *esd, "--output", tmp_path / "esd-b")
    assert sha256(tmp_path / "esd-a" / "erased.safetensors") == sha256(tmp_path / "esd-b" / "erased.safetensors")
    run("uce.py", "--model", "toy", "--concept", "circle", "--sample_steps", "2", "--output", tmp_path / "uce")
    evaluation = ["--model", "toy", "--concept", "circle", "--compare", tmp_path / "esd-a", tmp_path / "uce",
                  "--seeds", "1", "--far_seeds", "1", "--limit", "6", "--attack", "both", "--attack_timesteps", "1",
                  "--attack_iterations", "2", "--soft_steps", "4", "--soft_checks", "1"]
    run("evaluate.py", *evaluation, "--output", tmp_path / "eval-a")
    run("evaluate.py", *evaluation, "--output", tmp_path / "eval-b")
    a, b = (json.loads((tmp_path / f"eval-{x}" / "metrics.json").read_text()) for x in "ab")
    assert a.pop("evaluation_seconds") is not None and b.pop("evaluation_seconds") is not None
    assert a == b  # every rate, count, interval, verdict (label and score), fidelity number and adversarial prompt
    assert any(r.get("attacked") for r in a["rows"][1:])  # an attack ran, so its outcome is compared too
    images = sorted(p.relative_to(tmp_path / "eval-a") for p in (tmp_path / "eval-a" / "images").rglob("*.png"))
    assert images and all(sha256(tmp_path / "eval-a" / p) == sha256(tmp_path / "eval-b" / p) for p in images)
