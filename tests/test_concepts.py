"""Concept kinds and concept files (docs/concepts.md): the format, what each kind resolves to in every method,
and the refusals. Expected values are the documented tables, written out here by hand."""
import json
from pathlib import Path

import pytest

import common
import esd
import evaluate
import uce
from conftest import refused

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# The format
# ---------------------------------------------------------------------------------------------
def test_builtin_concepts_are_the_three_files():
    builtins = common.builtin_concepts()
    assert list(builtins) == ["church", "nudity", "van gogh"]  # sorted by file name
    nudity = common.concept_info("Nudity", common.SD14)
    raw = json.loads((ROOT / "concepts" / "nudity.json").read_text())
    assert nudity["kind"] == "nudity" and nudity["words"] == raw["words"] and nudity["near"] == raw["near"]
    assert nudity["anchors"]["domain_correction"] == "clothed" and len(nudity["related"]) == 20
    assert nudity["others"] == ["van gogh", "church"]
    assert common.concept_info("van gogh", common.SD14)["anchor"] == "art"


def test_a_concept_file_round_trips(tmp_path):
    """concept_info's answer, written as a file and read back, is the same concept."""
    info = common.concept_info("church", common.SD14)
    path = tmp_path / "church.json"
    path.write_text(json.dumps({k: v for k, v in info.items() if v is not None}))
    assert common.read_concept_file(path) == info
    assert common.concept_info(None, common.SD14, concept_file=str(path)) == info


def test_a_minimal_file_takes_its_kinds_defaults(tmp_path):
    path = tmp_path / "monet.json"
    path.write_text(json.dumps({"name": "Claude Monet", "kind": "style", "words": ["Claude Monet", "Monet"]}))
    info = common.concept_info(None, common.SD14, concept_file=str(path))
    assert info["name"] == "claude monet" and info["words"] == ["Claude Monet", "Monet"]
    assert info["anchor"] == "art" and info["templates"] == common.KIND_TEMPLATES["style"]
    assert info["held_out"] == [] and info["anchors"] == {} and info["related"] is None
    assert info["others"] == ["church", "nudity", "van gogh"]


def test_flags_beat_the_file():
    path = str(ROOT / "concepts" / "examples" / "claude_monet.json")
    assert common.concept_info(None, common.SD14, kind="object", concept_file=path)["kind"] == "object"
    assert common.concept_info("monet", common.SD14, concept_file=path)["name"] == "monet"
    assert common.concept_info("church", common.SD14, kind="style")["kind"] == "style"


def test_a_bare_concept_needs_a_kind(capsys):
    message = refused(capsys, lambda: common.concept_info("claude monet", common.SD14))
    assert "--kind" in message and "--concept_file" in message
    bare = common.concept_info("Claude Monet", common.SD14, kind="style")
    assert bare["words"] == ["Claude Monet"] and bare["anchor"] == "art" and bare["kind"] == "style"
    assert common.concept_info("snoopy", common.SD14, kind="object")["anchor"] == ""


@pytest.mark.parametrize("content, expected", [
    ("{", "not valid JSON"),
    ("[1, 2]", "one JSON object"),
    ('{"name": "x", "kind": "style"}', "needs 'words'"),
    ('{"name": "x", "kind": "painting", "words": ["x"]}', "'kind' must be one of object, style, nudity"),
    ('{"name": "x", "kind": "style", "words": ["x"], "held_outs": ["y"]}', "unknown key 'held_outs'"),
    ('{"name": "x", "kind": "style", "words": ["x"], "templates": ["a painting"]}', "exactly one '{}'"),
    ('{"name": "x", "kind": "style", "words": "x"}', "'words' must be a list"),
    ('{"name": "x", "kind": "style", "words": ["x"], "anchors": {"uce": 3}}', "'anchors' must map"),
    ('{"name": "a, b", "kind": "style", "words": ["x"]}', "has a comma"),
    ('{"name": "x", "kind": "style", "words": ["x"], "templates": ["a {}"]}', "at least two templates"),
    ('{"name": "x", "kind": "style", "words": ["x"], "related": []}', "'related' is an empty list"),
    ('{"name": "x", "kind": "style", "words": ["x"], "anchors": {"uec": "y"}}', "'uec', which is not a method"),
    ('{"name": "x", "kind": "style", "words": ["x"], "words": ["y"]}', "gives the key 'words' twice"),
])
def test_a_bad_file_is_one_sentence(tmp_path, capsys, content, expected):
    path = tmp_path / "c.json"
    path.write_text(content)
    assert expected in refused(capsys, lambda: common.read_concept_file(path))


def test_the_miniature_world_refuses_files_and_contradicting_kinds(capsys):
    assert "leave --concept_file out" in refused(capsys, lambda: common.concept_info(
        "circle", "toy", concept_file=str(ROOT / "concepts" / "church.json")))
    assert "leave --kind out" in refused(capsys, lambda: common.concept_info("red", "toy", kind="object"))
    assert common.concept_info("circle", "toy", kind="object")["kind"] == "object"


# ---------------------------------------------------------------------------------------------
# Each kind resolves to the documented settings
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, train_method", [("style", "xattn"), ("object", "noxattn"), ("nudity", "noxattn")])
def test_esd_kind_defaults(kind, train_method):
    assert esd.default_train_method(common.concept_info("x", common.SD14, kind=kind)) == train_method


def test_uce_kind_defaults():
    assert uce.KIND_DEFAULTS["style"] == {"guide": "art", "expand": "style"}
    assert uce.KIND_DEFAULTS["object"] == uce.KIND_DEFAULTS["nudity"] == {"guide": "", "expand": "object"}


# ---------------------------------------------------------------------------------------------
# Through the command line
# ---------------------------------------------------------------------------------------------
def test_an_unknown_concept_without_kind_writes_nothing(sd_like_path, tmp_path, capsys):
    out = tmp_path / "out"
    message = refused(capsys, lambda: uce.main(["--model", str(sd_like_path), "--concept", "claude monet",
                                                "--output", str(out)]))
    assert "--kind" in message and not out.exists()


def test_no_concept_at_all_is_one_sentence(capsys):
    assert "--concept NAME" in refused(capsys, lambda: uce.main(["--model", "toy"]))
    assert "--kind must be one of" in refused(capsys, lambda: uce.main(["--model", "toy", "--concept", "circle",
                                                                        "--kind", "painting"]))
    assert "no such file" in refused(capsys, lambda: uce.main(["--model", "toy", "--concept_file", "nope.json"]))


def test_uce_style_run_records_the_style_settings(sd_like_path, tmp_path):
    out = tmp_path / "uce"
    uce.main(["--model", str(sd_like_path), "--concept", "claude monet", "--kind", "style", "--expand",
              "--sample_steps", "2", "--device", "cpu", "--output", str(out)])
    config = json.loads((out / "config.json").read_text())
    assert config["guide"] == "art" and config["concept"]["kind"] == "style"
    assert "painting by claude monet" in config["erase_prompts"] and config["args"]["kind"] == "style"


def test_esd_concept_file_alone_names_the_concept(sd_like_path, tmp_path):
    out = tmp_path / "esd"
    esd.main(["--model", str(sd_like_path), "--concept_file", str(ROOT / "concepts" / "examples" / "claude_monet.json"),
              "--iterations", "1", "--ddim_steps", "2", "--sample_steps", "2", "--device", "cpu", "--output", str(out)])
    config = json.loads((out / "config.json").read_text())
    assert config["train_method"] == "xattn" and config["concept"]["name"] == "claude monet"
    assert config["words"] == ["Claude Monet", "Monet"] and config["args"]["concept"] == "claude monet"


def test_evaluate_reads_a_concept_file():
    """evaluate.py's SD prompt suites from a concept file: its words, held-out words, near concepts, and the far
    concepts of its 'others' (built-in ones from their own files)."""
    path = str(ROOT / "concepts" / "examples" / "claude_monet.json")
    info = common.concept_info(None, common.SD14, concept_file=path)
    args = evaluate.Args(concept=None, concept_file=path, model=common.SD14, seeds=1, far_seeds=1)
    suites = evaluate.sd_suites(info, args)
    assert [x["prompt"] for x in suites["efficacy"]][:1] == ["a painting in the style of Claude Monet"]
    assert {x["target"] for x in suites["near"]} == {"Pierre-Auguste Renoir", "Camille Pissarro", "Van Gogh"}
    assert {x["target"] for x in suites["far"]} == {"church", "nudity"}
    assert "a photo of a church" in [x["prompt"] for x in suites["far"]]


def test_sage_runs_a_new_style_on_the_sd_interface(sd_like_path, tmp_path):
    """SAGE has no per-kind setting; a new artist with --kind style runs, and config.json records the concept as
    SAGE saw it. (The other methods' style runs: tests/test_realera.py, test_domain_correction.py, test_sgrace.py
    and the ESD / UCE runs above.)"""
    import sage

    out = tmp_path / "sage-monet"
    sage.main(["--model", str(sd_like_path), "--concept", "claude monet", "--kind", "style", "--iterations", "2",
               "--warm_up", "1", "--ddim_steps", "2", "--global_candidates", "200", "--unet_batch", "1",
               "--sample_steps", "2", "--device", "cpu", "--output", str(out)])
    config = json.loads((out / "config.json").read_text())
    assert config["concept"]["kind"] == "style" and config["concept"]["anchor"] == "art"
    assert config["words"] == ["claude monet"]


def test_a_folder_or_non_utf8_file_is_named_as_such(tmp_path, capsys):
    assert "is a folder" in refused(capsys, lambda: common.read_concept_file(tmp_path))
    path = tmp_path / "latin1.json"
    path.write_bytes('{"name": "caf\xe9", "kind": "object", "words": ["x"]}'.encode("latin-1"))
    assert "not UTF-8" in refused(capsys, lambda: common.read_concept_file(path))


def test_kind_is_case_insensitive_and_colour_is_a_toy_kind(capsys):
    args = common.parse_args(uce.Args, ["--model", "toy", "--concept", "red", "--kind", "Colour"])
    assert args.kind == "colour"
    assert "must be one of object, style, nudity" in refused(
        capsys, lambda: common.parse_args(uce.Args, ["--concept", "red", "--kind", "colour"]))


def test_a_files_kind_is_case_insensitive_as_the_flag_is(tmp_path):
    path = tmp_path / "monet.json"
    path.write_text(json.dumps({"name": "Claude Monet", "kind": " Style", "words": ["Claude Monet"]}))
    info = common.concept_info(None, common.SD14, concept_file=str(path))
    assert info["kind"] == "style" and info["anchor"] == "art"


def test_esd_and_uce_read_their_own_anchor_from_the_file(tmp_path):
    """The file's 'anchors' entry for esd / uce replaces the paper's target; the plain 'anchor' does not."""
    path = tmp_path / "teddy.json"
    path.write_text(json.dumps({"name": "teddy", "kind": "object", "words": ["teddy bear"], "anchor": "a toy",
                                "anchors": {"uce": "a doll"}}))
    info = common.concept_info(None, common.SD14, concept_file=str(path))
    args = common.parse_args(uce.Args, ["--concept_file", str(path)])
    assert uce.concept_prompts(args, info)[1] == "a doll"
    plain = dict(info, anchors={})
    assert uce.concept_prompts(args, plain)[1] == ""  # the kind's guide, not the file's 'anchor'
