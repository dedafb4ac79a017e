"""Every flag of every script is checked before anything loads: a mistake ends with exit status 2 and one line on
stderr, never a traceback, and writes nothing; every combination of a method's switches runs or is refused so."""
import dataclasses
import itertools
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch

import benchmark
import common
import domain_correction
import esd
import evaluate
import realera
import sage
import sgrace
import uce
from conftest import refused

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"esd": esd, "uce": uce, "sage": sage, "realera": realera, "domain_correction": domain_correction,
           "sgrace": sgrace}
SCRIPTS = {**METHODS, "evaluate": evaluate}
# Budgets that make a run on the miniature model take about a second.
TINY = {
    "esd": "--iterations 2 --ddim_steps 3 --samples circle",
    "uce": "--samples circle",
    "sage": "--iterations 2 --ddim_steps 3 --warm_up 0 --search_steps 2 --global_candidates 64 --global_batch 8 "
            "--local_batch 1 --local_pool 4 --samples circle",
    "realera": "--iterations 2 --n_trajectories 1 --ddim_steps 2 --batch_size 2 --samples circle",
    "domain_correction": "--iterations 2 --warm_up 1 --batch_size 2 --n_anchor_images 3 --anchor_steps 2 --samples circle",
    "sgrace": "--rounds 1 --attack_steps 1 --erase_steps 2 --adv_samples 2 --latent_steps 3 --samples circle",
    "evaluate": "--seeds 1 --far_seeds 0 --steps 2 --attack_timesteps 1 --attack_iterations 1 --soft_steps 2 --soft_checks 1",
}


class Loaded(Exception):
    """Raised instead of loading a model: the flags were accepted."""


@pytest.fixture()
def no_loading(monkeypatch):
    def load(*args, **kwargs):
        raise Loaded()

    monkeypatch.setattr(common, "load_pipeline", load)


def field_kinds(module) -> dict:
    """{field: int | float | str | bool | list} of the script's Args, Optional unwrapped."""
    return {name: list if typing.get_origin(hint) is list else next(
        (a for a in typing.get_args(hint) if a is not type(None)), hint)
        for name, hint in typing.get_type_hints(module.Args).items()}


def base_flags(name: str, tmp_path: Path) -> dict:
    """The flags every run below starts from (evaluate.py reads tmp_path/uce, an erased model)."""
    return {"--model": "toy", "--concept": "circle", "--output": str(tmp_path / "out"),
            **({"--erased": str(tmp_path / "uce")} if name == "evaluate" else {})}


def base_argv(name: str, tmp_path: Path) -> list[str]:
    return [a for pair in base_flags(name, tmp_path).items() for a in pair]


@pytest.fixture()
def fake_erased(tmp_path) -> Path:
    """tmp_path/uce: a folder in the erased-model format, enough for the checks that run before loading."""
    return common.save_erased(tmp_path / "uce", {"unet.x": torch.ones(1)}, "uce", {}, "toy", 0)


# ---------------------------------------------------------------------------------------------
# Every number has a range, every rule refuses what is outside it and accepts its edge
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SCRIPTS)
def test_every_number_flag_has_a_range_and_the_defaults_pass(name):
    module = SCRIPTS[name]
    numbers = {f for f, kind in field_kinds(module).items() if kind in (int, float)}
    assert numbers <= set(module.LIMITS), f"{name}: no range for {sorted(numbers - set(module.LIMITS))}"
    for model, defaults in (("toy", getattr(module, "TOY_DEFAULTS", {})), (common.SD14, {})):
        common.check_args(module.Args(concept="circle", model=model, **defaults), module.LIMITS)


def edge_values(rule: str, kind) -> tuple[list, list]:
    """Values just outside a numeric rule of common.check_args, and its edges (which it accepts)."""
    step = 1 if kind is int else 0.5
    interval = re.fullmatch(r"([\[(])(\S+), (\S+)([\])])", rule)
    bounds = [(interval[1], float(interval[2])), (interval[4], float(interval[3]))] if interval else \
        [(rule.split()[0], float(rule.split()[1]))]
    outside, edges = [], []
    for side, bound in bounds:
        low = side in ("[", "(", ">=", ">")
        inclusive = side in ("[", "]", ">=", "<=")
        outside.append(bound - step if low and inclusive else bound + step if inclusive else bound)
        edges.append(bound if inclusive else bound + step if low else bound - step)
    cast = int if kind is int else float
    return [cast(v) for v in outside], [cast(v) for v in edges]


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_rule_refuses_what_is_outside_it_before_loading(name, tmp_path, capsys, no_loading, fake_erased):
    module, kinds = SCRIPTS[name], field_kinds(SCRIPTS[name])
    (tmp_path / "empty").mkdir()
    for field, rule in module.LIMITS.items():
        kind, flag = kinds[field], f"--{field}"
        if isinstance(rule, tuple):
            # fp16 needs a GPU (refused on a CPU: tests/test_memory.py); its acceptance depends on the machine
            bad, good = ["nonsense"], [v for v in rule if not (v == "fp16" and not torch.cuda.is_available())]
        elif rule in ("file", "non-empty", "erased model", "erased-model output"):
            bad = {"file": [str(tmp_path / "missing.txt")], "non-empty": [" "], "erased model": [str(tmp_path / "empty")],
                   "erased-model output": [str(common.TOY_DIR / "unet")]}[rule]
            good = []
        else:
            bad, good = edge_values(rule, kind)
        argv = [a for pair in base_flags(name, tmp_path).items() if pair[0] != flag for a in pair]
        for value in bad:
            message = refused(capsys, lambda: module.main([*argv, flag, str(value)]))
            assert flag in message or "erased model" in message or "base model" in message, (field, value, message)
        for value in good:
            args = common.parse_args(module.Args, [*argv, flag, str(value)], getattr(module, "TOY_DEFAULTS", {}),
                                     module.LIMITS)
            assert getattr(args, field) in (value, [value]), (field, value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", SCRIPTS)
def test_shared_mistakes_are_one_sentence_before_loading(name, tmp_path, capsys, no_loading, monkeypatch, fake_erased):
    """--concept empty or with a comma, a device this machine lacks, a number that is not finite, a missing
    local model folder: refused before anything loads, nothing written."""
    module = SCRIPTS[name]
    argv = base_argv(name, tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a GPU machine
    float_flag = next(f for f, kind in field_kinds(module).items() if kind is float)
    cases = [(["--concept", ""], "--concept is empty"),
             (["--concept", "violence, nudity, harm"], "repeat the flag (--concept 'violence' --concept 'nudity'"),
             (["--device", "cuda"], "--device cuda needs a CUDA GPU"),
             (["--device", "gpu"], "not a device name"),
             ([f"--{float_flag}", "nan"], f"--{float_flag} must be a finite number"),
             (["--model", str(tmp_path / "no" / "such")], "no such folder"),
             (["--no_such_flag", "1"], "unrecognized arguments"),
             ([f"--{float_flag}", "x"], "invalid float value")]
    for extra, words in cases:
        assert words in refused(capsys, lambda: module.main([*argv, *extra])), extra
    assert not (tmp_path / "out").exists()


def test_common_benchmark_and_export_flags(tmp_path, capsys, no_loading):
    refused(capsys, lambda: common.main(["--seeds", "0"]))
    refused(capsys, lambda: common.main(["--prompts"]))
    refused(capsys, lambda: common.main(["--erased", str(tmp_path)]))
    refused(capsys, lambda: common.main(["export", "--erased", str(tmp_path), "--output", str(tmp_path / "x")]))
    assert "--methods must be one of" in refused(capsys, lambda: benchmark.main(["--methods", "uce", "nope"]))
    for quick, reuse in itertools.product([True, False], repeat=2):  # its switches: every combination is accepted
        common.parse_args(benchmark.Args, [f"--{'' if quick else 'no_'}quick", f"--{'' if reuse else 'no_'}reuse"])


# ---------------------------------------------------------------------------------------------
# Every combination of a method's switches: written, or one sentence
# ---------------------------------------------------------------------------------------------
def switches(module) -> list[str]:
    return [f for f, kind in field_kinds(module).items() if kind is bool]


def choices(module) -> dict:
    return {f: rule for f, rule in module.LIMITS.items() if isinstance(rule, tuple)}


def combination(names: list[str], values) -> list[str]:
    return [f"--{'' if on else 'no_'}{n}" for n, on in zip(names, values)]


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_combination_of_switches_and_choices_is_accepted_or_refused(name, tmp_path, capsys, no_loading,
                                                                         fake_erased):
    """The checks alone (no model), for every combination of the boolean switches and the choice flags."""
    module = SCRIPTS[name]
    bools, options = switches(module), choices(module)
    for values in itertools.product(*[[True, False]] * len(bools), *options.values()):
        picked = [f"--{f}={v}" for f, v in zip(options, values[len(bools):])]
        argv = [*base_argv(name, tmp_path), *TINY[name].split(), *combination(bools, values), *picked]
        try:
            module.main(argv)
        except Loaded:
            continue
        except SystemExit as exc:
            assert exc.code == 2 and "\n" not in str(exc) and str(exc).startswith("error: "), argv
            capsys.readouterr()
    assert not (tmp_path / "out").exists()


def outcome(module, argv: list[str], out: Path, files: list[str], capsys) -> str:
    """'written' (the output folder holds `files`) or 'refused' (exit 2, one line, nothing written)."""
    try:
        module.main(argv)
    except SystemExit as exc:
        assert exc.code == 2 and "\n" not in str(exc) and str(exc).startswith("error: "), (argv, str(exc))
        assert capsys.readouterr().err.strip().splitlines()[-1] == str(exc) and not out.exists(), argv
        return "refused"
    assert all((out / f).exists() for f in files), argv
    return "written"


@pytest.mark.parametrize("name", SCRIPTS)
def test_switch_combinations_run_end_to_end(name, tmp_path, capsys):
    """Each script for real with tiny budgets: every combination of its boolean switches (SAGE, with five:
    all on, all off and each one off alone; the checks alone cover its other combinations above), and each
    other value of each choice flag once."""
    module = SCRIPTS[name]
    if name == "evaluate":
        uce.main(["--model", "toy", "--concept", "circle", "--output", str(tmp_path / "uce"), *TINY["uce"].split()])
    bools, options = switches(module), choices(module)
    combos = list(itertools.product([True, False], repeat=len(bools)))
    if len(bools) > 2:
        combos = [(True,) * len(bools), (False,) * len(bools)] + [
            tuple(j != i for j in range(len(bools))) for i in range(len(bools))]
    runs = [combination(bools, values) for values in combos]
    defaults = {f.name: f.default for f in dataclasses.fields(module.Args)}
    runs += [[f"--{f}={v}"] for f, rule in options.items() for v in rule if v != defaults[f]]  # the default ran above
    results = {}
    for k, extra in enumerate(runs):
        out = tmp_path / f"out{k}"
        argv = [*base_argv(name, tmp_path), *TINY[name].split(), *extra, "--output", str(out)]
        files = ["report.md", "metrics.json"] if name == "evaluate" else ["erased.safetensors", "config.json"]
        results[" ".join(extra)] = outcome(module, argv, out, files, capsys)
    assert "written" in results.values(), results


# ---------------------------------------------------------------------------------------------
# As a user runs them: exit status 2, exactly one line on stderr
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [
    "esd.py --model toy --concept circle --device cuda",
    "uce.py --model toy --concept ''",
    "sage.py --model toy --concept 'circle, red'",
    "realera.py --model toy --concept circle --s_low 0.9 --s_high 0.5",
    "domain_correction.py --model toy --concept circle --iterations 5 --warm_up 5",
    "sgrace.py --model toy --concept circle --timestep_low 900 --timestep_high 800",
    "evaluate.py --model toy --concept circle --nudenet_threshold 1.5",
    "common.py --seeds 0",
    "common.py export --erased nowhere --output x",
    "benchmark.py --methods nope",
    "toyworld.py --device cuda",
])
def test_a_mistake_exits_2_with_one_line(command, tmp_path):
    import shlex

    argv = shlex.split(command)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, str(ROOT / argv[0]), *argv[1:]], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (command, result.stderr)
    assert not list(tmp_path.iterdir())  # nothing written
