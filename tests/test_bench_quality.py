"""The quality benchmark runs end to end in its CI-sized form; its figures live in bench/results, not here."""
import json
import runpy

from studio import paths


def test_a_quick_quality_run_completes_and_writes_its_table_and_contact_sheets(tmp_path):
    bench = runpy.run_path(str(paths.PROJECT_ROOT / "bench" / "quality.py"), run_name="bench")
    bench["main"](["--quick", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "quality.json").read_text())
    rows = report["suites"]["distinct"]
    assert {"merge", "regional", "regional (auto regions)"} <= set(rows)
    for row in rows.values():
        assert 0.0 <= row["all_right"] <= 1.0 and row["n"] == 2 and len(row["ci"]) == 2
        assert (tmp_path / row["contact_sheet"]).is_file()
    assert (tmp_path / "quality.md").read_text().startswith("Split `test`")
