"""Every command in README.md runs as written (scripts with tiny budgets appended)."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_COMMAND = "python -m pytest -q -n 2 tests"
# Flags appended to a README command so that it finishes in seconds; the command itself is unchanged.
TINY = {
    "toyworld.py": "--vae_steps 2 --judge_steps 2 --text_steps 2 --steps 2 --images 64 --eval_seeds 0 --output {tmp}",
    "esd.py": "--iterations 2 --ddim_steps 3",
    "sage.py": "--iterations 2 --ddim_steps 3 --warm_up 0 --global_batch 8 --local_batch 1",
    "realera.py": "--iterations 2 --n_trajectories 1 --ddim_steps 2 --batch_size 2",
    "domain_correction.py": "--iterations 2 --warm_up 1 --batch_size 2 --n_anchor_images 3 --anchor_steps 2",
    "sgrace.py": "--rounds 1 --attack_steps 1 --erase_steps 2",
    "evaluate.py": "--seeds 1 --far_seeds 1 --attack_timesteps 1 --attack_iterations 2",
    "benchmark.py": "--quick --methods uce",
    "sdscale.py": "--narrow",
}


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [line.split("  #")[0].strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_readme_has_install_test_and_usage_first():
    commands = readme_commands()
    assert commands[0] == "pip install -r requirements.txt"
    assert commands[1] == TEST_COMMAND
    assert commands[2].startswith("python ") and "--model toy" in commands[2]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q -r requirements.txt" in ci
    assert TEST_COMMAND.replace("python", "python3") in ci


def test_every_readme_command_runs(tmp_path):
    for command in readme_commands():
        if command == TEST_COMMAND:
            continue  # this is the command running us
        argv, cwd = shlex.split(command), ROOT
        if argv[0] == "python":
            # run from a scratch folder, so that outputs/ of the checkout (a reader's results) is never touched
            argv[0], cwd = sys.executable, tmp_path
            script = Path(argv[1]).name
            argv[1] = str(ROOT / argv[1])
            argv += TINY.get(script, "").format(tmp=tmp_path / script).split()
        elif argv[0] == "pip":
            argv = [sys.executable, "-m", "pip", *argv[1:], "-q"]
        result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
