"""benchmark.py --quick: every method and baseline erase one concept, evaluate.py measures them, RESULTS is written."""
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
