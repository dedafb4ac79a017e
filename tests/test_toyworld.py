"""The miniature world: renderer + committed judge, and `toyworld.py --check`."""
import json
import sys

import numpy as np

import common
import toyworld


def test_committed_judge_reads_fresh_renders():
    rng = np.random.default_rng(123)
    factors = toyworld.random_factors(rng, 300)
    pred = toyworld.judge_images(toyworld.load_judge(), toyworld.render_batch(factors, rng))
    names = {"object": toyworld.OBJECTS, "colour": toyworld.COLOURS, "size": toyworld.SIZES,
             "background": toyworld.BACKGROUNDS}
    for i, k in enumerate(names):
        acc = np.mean([p == names[k][t] for p, t in zip(pred[k], factors[:, i])])
        assert acc >= 0.98, (k, acc)


def test_check_remeasures_an_existing_build(tmp_path, monkeypatch):
    tiny = ["--vae_steps", "2", "--judge_steps", "2", "--text_steps", "2", "--steps", "3", "--images", "64",
            "--output", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", ["toyworld.py", *tiny, "--eval_seeds", "0"])
    toyworld.main()
    build = json.loads((tmp_path / "toy_judge" / "build_log.json").read_text())
    assert build["train_seconds"] > 0 and "generator_canonical" not in build  # --eval_seeds 0 builds only
    monkeypatch.setattr(common, "TOY_SAMPLING", {"steps": 2, "guidance": 3.0})
    monkeypatch.setattr(sys, "argv", ["toyworld.py", "--check", "--eval_seeds", "1", "--output", str(tmp_path)])
    toyworld.main()
    log = json.loads((tmp_path / "toy_judge" / "build_log.json").read_text())
    assert log["train_seconds"] == build["train_seconds"]  # kept from the build
    assert log["acceptance_sampling"] == {"steps": 2, "guidance": 3.0, "seeds": "0..0"}
    n_pairs = len(toyworld.OBJECTS) * len(toyworld.COLOURS)
    assert log["generator_canonical"]["images"] == n_pairs
    assert 0 <= log["generator_canonical"]["object_accuracy"] <= 1
    assert set(log["synonym_cosines"]) == set(toyworld.OBJECTS)
    assert (tmp_path / "toy_samples.png").exists()
