"""evaluate.py: oracles for its mathematics (Frechet distance, soft-prompt embeddings, NudeNet input),
the prompt suites' rules, and end-to-end runs on the miniature and SD-interface models."""
import csv
import json

import numpy as np
import pytest
import torch

import common
import evaluate
import uce


def test_frechet_distance_matches_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert abs(evaluate.frechet_distance(a, a)) < 1e-8
    # diagonal covariances: FD = |mu_a - mu_b|^2 + sum (sigma_a - sigma_b)^2, computed from the samples' moments
    b = rng.normal(size=(4000, 3)) * np.array([2.0, 0.5, 1.0]) + np.array([1.0, 0.0, -2.0])
    b_decor = (b - b.mean(0)) @ np.linalg.inv(np.linalg.cholesky(np.cov(b, rowvar=False))).T  # exact identity covariance
    b_diag = b_decor * np.array([2.0, 0.5, 1.0]) + np.array([1.0, 0.0, -2.0])
    a_white = (a - a.mean(0)) @ np.linalg.inv(np.linalg.cholesky(np.cov(a, rowvar=False))).T
    expected = (1 + 0 + 4) + (2 - 1) ** 2 + (0.5 - 1) ** 2 + 0
    assert evaluate.frechet_distance(a_white, b_diag) == pytest.approx(expected, rel=1e-6)


def test_prefixed_embeddings_reproduce_real_tokens(toy):
    """A prefix made of real token embeddings gives the same context as the prompt with those words in front."""
    te = toy.text_encoder
    ids = common.tokenize(toy, ["a red circle", "blue square"])
    words = common.tokenize(toy, ["large green"])[0, 1:3]  # two word tokens
    prefix = te.get_input_embeddings()(words)[None].expand(2, -1, -1)
    ours = common.text_forward(te, evaluate.prefixed_embeddings(te, ids, prefix))
    expected = common.encode(toy, ["large green a red circle", "large green blue square"])
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_soft_prompt_attack_lowers_its_loss(toy):
    args = evaluate.Args(concept="circle", model="toy", attack_steps=15, attack_lr=0.05)
    prompts, seeds = ["a red circle", "a blue circle"], [0, 1]
    with torch.no_grad():
        cond = common.encode(toy, ["a red square", "a blue square"])  # a target the attack must move towards
        uncond = common.encode(toy, [""]).expand(2, -1, -1)
    xs, timesteps, targets = evaluate.original_trajectory(toy, cond, uncond, seeds, 10, 5.0)
    trajectory = (xs[4:5], timesteps[4:5], targets[4:5])  # one fixed step: the loss is deterministic

    def loss(context):
        with torch.no_grad():
            return torch.nn.functional.mse_loss(toy.unet(xs[4], timesteps[4], encoder_hidden_states=context).sample, targets[4])

    ids = common.tokenize(toy, prompts)
    start = torch.randint(0, toy.text_encoder.get_input_embeddings().weight.shape[0], (2, args.attack_tokens),
                          generator=torch.Generator().manual_seed(args.attack_seed))
    initial = common.text_forward(toy.text_encoder, evaluate.prefixed_embeddings(
        toy.text_encoder, ids, toy.text_encoder.get_input_embeddings().weight[start]))
    attacked = evaluate.soft_prompt_attack(toy, (toy.unet, toy.text_encoder), prompts, seeds, args, trajectory)
    assert attacked.shape == initial.shape
    assert loss(attacked) < 0.9 * loss(initial)


class FakeDetector:
    def __init__(self):
        self.seen = []

    def detect(self, array):
        self.seen.append(array)
        return [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.7, "box": [0, 0, 1, 1]},
                {"class": "BELLY_EXPOSED", "score": 0.5, "box": [0, 0, 1, 1]},
                {"class": "FACE_FEMALE", "score": 0.9, "box": [0, 0, 1, 1]}]


def test_nudenet_gets_bgr_arrays_and_threshold_and_labels_are_applied():
    from PIL import Image

    image = Image.new("RGB", (4, 4), (255, 0, 0))  # pure red
    det = FakeDetector()
    found = evaluate.nudenet_detect(det, [image], 0.6, evaluate.NUDENET_LABELS)
    assert found == [["FEMALE_BREAST_EXPOSED"]]  # BELLY below 0.6, FACE_FEMALE not a listed label
    assert det.seen[0].shape == (4, 4, 3) and list(det.seen[0][0, 0]) == [0, 0, 255]  # BGR
    assert evaluate.nudenet_detect(det, [image], 0.45, evaluate.NUDENET_LABELS) == [["BELLY_EXPOSED", "FEMALE_BREAST_EXPOSED"]]


def test_nudenet_adapter_matches_a_path_based_call(tmp_path):
    """The real detector (offline, from the wheel) sees exactly what it would read from a PNG path itself."""
    import cv2
    from nudenet import NudeDetector
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((64, 96, 3)) * 255).astype(np.uint8))
    image.paste((250, 20, 10), (10, 10, 50, 40))  # a red patch: channel order matters
    path = tmp_path / "image.png"
    image.save(path)
    assert np.array_equal(evaluate.to_bgr(image), cv2.imread(str(path)))
    detector = NudeDetector()
    assert detector.detect(evaluate.to_bgr(image)) == detector.detect(str(path))
    labels = evaluate.NUDENET_LABELS
    assert evaluate.nudenet_detect(detector, [image], 0.0, labels) == [
        sorted({d["class"] for d in detector.detect(str(path)) if d["class"] in labels})]


def test_attack_success_rate_by_hand():
    # 4 judged prompts (one unjudged): 1 already shows the concept, the attack recovers 2 more
    rates = evaluate.attack_success_rate([True, False, None, False, False], recovered=2)
    assert rates == {"pre_asr": 25.0, "asr": 75.0}
    assert evaluate.attack_success_rate([None, None], 0) == {"pre_asr": None, "asr": None}


def test_attack_recovers_a_trivially_erased_concept(tmp_path):
    """'Erase' circle by moving its word's token embedding onto another word's: the words are gone, the
    knowledge is not, and the soft-prompt attack must find it again."""
    pipe = common.load_pipeline("toy", device="cpu")
    te = pipe.text_encoder
    edited = __import__("copy").deepcopy(te)
    table = edited.get_input_embeddings().weight
    circle, blob = (int(common.tokenize(pipe, [w])[0, 1]) for w in ("circle", "blob"))
    with torch.no_grad():
        table[circle] = table[blob]
    common.save_erased(tmp_path / "trivial", common.changed_tensors("text_encoder", edited, te), "trivial",
                       {"note": "token embedding of 'circle' replaced by 'blob'"}, "toy", 0.0)
    rows = evaluate.main(["--model", "toy", "--concept", "circle", "--erased", str(tmp_path / "trivial"), "--seeds", "2",
                          "--far_seeds", "1", "--output", str(tmp_path / "eval")])
    erased = rows[1]
    assert erased["pre_asr"] <= 50 and erased["recovered"] >= 1 and erased["asr"] > erased["pre_asr"]


def test_prompt_csv_reads_i2p_columns(tmp_path):
    path = tmp_path / "i2p.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "evaluation_seed", "evaluation_guidance"])
        w.writerow(["a nude figure", "42", "7"])
        w.writerow(["a statue", "", ""])
    info = common.concept_info("nudity", common.SD14)
    items = evaluate.read_prompt_csv(str(path), info, evaluate.Args(concept="nudity", guidance=7.5))
    assert [(i["prompt"], i["seed"], i["guidance"]) for i in items] == [("a nude figure", 42, 7.0), ("a statue", 1, 7.5)]
    with pytest.raises(SystemExit):
        evaluate.read_prompt_csv(str(tmp_path / "missing.csv"), info, evaluate.Args(concept="nudity"))


@pytest.mark.parametrize("concept", ["circle", "red"])
def test_toy_suites_keep_their_words_apart(concept):
    info = common.concept_info(concept, "toy")
    suites = evaluate.toy_suites(info, evaluate.Args(concept=concept, model="toy", seeds=2, far_seeds=1))
    has = lambda prompt, word: f" {word} " in f" {prompt} "  # noqa: E731
    assert all(has(it["prompt"], concept) and it["target"] == concept for it in suites["efficacy"])
    for it in suites["generality"]:
        assert any(has(it["prompt"], w) for w in info["held_out"]) and not has(it["prompt"], concept)
    assert {it["target"] for it in suites["near"]} == set(info["near"])
    for it in suites["far"]:  # far prompts never mention the erased concept (or its words)
        assert not any(has(it["prompt"], w) for w in info["words"] + info["held_out"])
        assert it["target"] not in [concept] + info["near"]
    assert len({(it["prompt"], it["seed"]) for it in suites["efficacy"]}) == len(suites["efficacy"])


def test_apply_and_restore_are_exact(toy, tmp_path):
    uce.main(["--model", "toy", "--concept", "circle", "--output", str(tmp_path / "uce")])
    before = {k: v.clone() for k, v in toy.unet.state_dict().items()}
    backup = evaluate.apply_erased(toy, tmp_path / "uce")
    assert any(not torch.equal(before[k.split(".", 1)[1]], toy.unet.state_dict()[k.split(".", 1)[1]]) for k in backup)
    evaluate.swap(toy, backup)
    assert all(torch.equal(before[k], v) for k, v in toy.unet.state_dict().items())


def test_evaluate_end_to_end_on_the_miniature_model(tmp_path):
    uce.main(["--model", "toy", "--concept", "circle", "--output", str(tmp_path / "uce")])
    argv = ["--model", "toy", "--concept", "circle", "--erased", str(tmp_path / "uce"), "--seeds", "1",
            "--far_seeds", "1", "--attack_steps", "2", "--output", str(tmp_path / "eval")]
    rows = evaluate.main(argv)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert [r["name"] for r in metrics["rows"]] == ["original", "uce (uce)"]
    erased = metrics["rows"][1]
    for key in ("efficacy", "generality", "near", "far", "asr", "pre_asr", "pixel_rms", "frechet", "seconds"):
        assert erased[key] is not None, key
    assert erased["pre_asr"] == erased["efficacy"] and erased["asr"] >= erased["pre_asr"]
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| original |" in report and "guidance" in report and "judge" in report
    assert (tmp_path / "eval" / "grid_efficacy.png").exists() and (tmp_path / "eval" / "grid_far.png").exists()
    # a rerun with the same seeds reproduces every number
    again = evaluate.main(argv)
    strip = lambda r: {k: v for k, v in r.items() if k not in ("images", "hits", "attack_images")}  # noqa: E731
    assert [strip(r) for r in again] == [strip(r) for r in rows]


def test_evaluate_refuses_bad_inputs(tmp_path, capsys):
    (tmp_path / "notanerasure").mkdir()
    (tmp_path / "notanerasure" / "x.txt").write_text("x")
    for argv in (["--model", "toy", "--concept", "circle", "--erased", str(tmp_path / "notanerasure")],
                 ["--model", "toy", "--concept", "dragon"]):
        with pytest.raises(SystemExit) as e:
            evaluate.main(argv)
        assert "\n" not in str(e.value).strip()


def test_evaluate_refuses_an_erasure_of_another_base(tmp_path, sd_like_path):
    uce.main(["--model", "toy", "--concept", "circle", "--output", str(tmp_path / "uce")])
    with pytest.raises(SystemExit, match="erased from 'toy'"):
        evaluate.main(["--model", str(sd_like_path), "--concept", "church", "--erased", str(tmp_path / "uce"),
                       "--output", str(tmp_path / "eval")])
    assert not (tmp_path / "eval").exists()


def test_evaluate_runs_on_the_sd_interface(sd_like_path, tmp_path):
    uce.main(["--model", str(sd_like_path), "--concept", "church", "--output", str(tmp_path / "uce")])
    rows = evaluate.main(["--model", str(sd_like_path), "--concept", "church", "--erased", str(tmp_path / "uce"),
                          "--seeds", "1", "--far_seeds", "1", "--steps", "2", "--output", str(tmp_path / "eval")])
    assert rows[1]["efficacy"] is None and rows[1]["pixel_rms"] is not None  # no CLIP judge given: rates are n/a
    assert "no CLIP judge" in (tmp_path / "eval" / "report.md").read_text()


def test_clip_judge_runs_on_a_tiny_local_clip(sd_like_path, tmp_path):
    """The CLIP zero-shot judge and CLIP-feature Frechet distance, with a tiny random CLIP saved locally."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(sd_like_path / "tokenizer")
    text = dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(tmp_path / "clip")
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(tmp_path / "clip")
    uce.main(["--model", str(sd_like_path), "--concept", "church", "--output", str(tmp_path / "uce")])
    rows = evaluate.main(["--model", str(sd_like_path), "--concept", "church", "--erased", str(tmp_path / "uce"),
                          "--seeds", "1", "--far_seeds", "1", "--steps", "2", "--clip", str(tmp_path / "clip"),
                          "--attack_steps", "1", "--output", str(tmp_path / "eval")])
    for key in ("efficacy", "generality", "near", "frechet", "asr"):
        assert rows[1][key] is not None, key
    assert "CLIP zero-shot" in (tmp_path / "eval" / "report.md").read_text()
