"""Reports: results JSON, markdown tables and PNG charts, stamped, written atomically."""

import json

import pytest

from reasonedit.eval.benchmark import SampleResult
from reasonedit.eval.benchmarks import RiseBenchmark, ShapesBenchmark
from reasonedit.eval.report import Stamp, ablation_table, section_table, write_json, write_reports


def shapes_results(success_concrete):
    return [
        SampleResult("e0", "concrete", "ok", {"success": success_concrete, "score": 7.0 + 3 * success_concrete},
                     meta={"kind": "recolor"}),
        SampleResult("t0", "abstract", "ok", {"success": 1.0, "score": 10.0}, meta={"kind": "relation"}),
        SampleResult("t1", "abstract", "missing", meta={"kind": "counting"}, error="no image"),
        SampleResult("t2", "abstract", "failed", meta={"kind": "counting"}, error="not a render"),
    ]


@pytest.fixture(scope="module")
def reports():
    bench = ShapesBenchmark(n=1)
    return {"base": bench.score(shapes_results(0.0)), "think_reflect": bench.score(shapes_results(1.0))}


STAMP = Stamp(model="ckpt-7", judge="oracle", temperature=0.0, resize_policy="none")


def test_write_reports_stamps_json_markdown_and_charts(tmp_path, reports):
    results = {"base": shapes_results(0.0)}
    paths = write_reports(tmp_path, reports, STAMP, results)
    doc = json.loads(paths["results"].read_text())
    assert doc["stamp"] == {"model": "ckpt-7", "judge": "oracle", "temperature": 0.0, "resize_policy": "none"}
    assert doc["modes"]["base"]["report"]["counts"] == {"total": 4, "ok": 2, "missing": 1, "failed": 1}
    assert [s["status"] for s in doc["modes"]["base"]["samples"]] == ["ok", "ok", "missing", "failed"]
    md = paths["markdown"].read_text()
    assert "model ckpt-7 | judge oracle (temperature 0) | resize none | 4 samples, 1 missing, 1 failed" in md
    assert "| concrete | 0.00 | 7.00 | 1 | 1 | 0 | 0 |" in md  # base: success 0 %, score 7
    for name in ("chart_all", "chart_by_kind"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))  # nothing half-written left behind


def test_ablation_table_lists_success_and_score_per_mode_on_both_kinds(reports):
    table = ablation_table(reports).splitlines()
    # base: concrete 0 % / 7.00; abstract: 1 of 1 scored (1 missing, 1 failed) -> 100 % / 10.00
    assert table[2] == "| base | 0.00 | 7.00 | 100.00 | 10.00 | 1 | 1 |"
    assert table[3] == "| think_reflect | 100.00 | 10.00 | 100.00 | 10.00 | 1 | 1 |"
    with pytest.raises(ValueError, match="not shapes"):
        ablation_table({"x": RiseBenchmark().score([])})


def test_section_table_shows_unscored_category_as_na():
    rep = RiseBenchmark().score([SampleResult("s1", "spatial_reasoning", "missing")])
    line = next(l for l in section_table(rep, "all").splitlines() if l.startswith("| spatial_reasoning"))
    # accuracy counts the missing sample as unsolved (RISE's rule); nothing else has a value
    assert line == "| spatial_reasoning | 0.00 | n/a | n/a | n/a | n/a | n/a | 1 | 0 | 1 | 0 |"


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = write_json(tmp_path / "results.json", {"a": 1})
    with pytest.raises(TypeError):
        write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
