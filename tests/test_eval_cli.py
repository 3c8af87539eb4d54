"""`reasonedit eval`: the shapes ablation table, scoring images made elsewhere (killed and resumed as a real
subprocess), and bad input named with exit status 1."""

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from reasonedit.cli import main
from reasonedit.testing.chat_server import ScriptedChatServer
from tests.conftest import kill_when_seen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_ablation_function_and_the_command_print_the_same_table(tiny_model_dir, small_dataset, tmp_path, capsys):
    from reasonedit.eval.ablation import run_shapes_ablation

    out = tmp_path / "ablation"
    ablation = run_shapes_ablation(tiny_model_dir, small_dataset, out, limit=2, steps=1, rounds=2, guidance=1.0)
    rows = ablation.table.splitlines()[2:]
    assert [r.split("|")[1].strip() for r in rows] == ["base", "think", "think_reflect"]
    for mode, report in ablation.reports.items():  # 2 concrete + 2 abstract held-out samples, all scored
        assert report["counts"] == {"total": 4, "ok": 4, "missing": 0, "failed": 0}
        assert all(report["sections"]["all"]["by_category"][c]["n"] == 2 for c in ("concrete", "abstract"))
    assert {"results", "markdown", "chart_all"} <= set(ablation.paths) and ablation.paths["chart_all"].is_file()

    code = main(["eval", "--bench", "shapes", "--data", str(small_dataset), "--model", str(tiny_model_dir),
                 "--modes", "base,think,think_reflect", "--limit", "2", "--steps", "1", "--rounds", "2",
                 "--guidance", "1", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0
    assert ablation.table in printed.out
    assert "generated 0 of 4 (4 already done)" in printed.err  # the command reused the function's images


def _gedit(root, n):
    root.mkdir()
    rows = []
    for i in range(n):
        Image.fromarray(np.full((16, 16, 3), 20 * i, np.uint8)).save(root / f"in{i}.png")
        rows.append({"key": f"k{i}", "task_type": "color_alter", "instruction": f"edit {i}",
                     "instruction_language": "en", "input_image": f"in{i}.png", "input_image_raw": f"in{i}.png",
                     "Intersection_exist": True})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_scoring_images_made_elsewhere_resumes_after_sigkill_without_judging_anything_twice(tmp_path):
    from reasonedit.eval.benchmarks import get_benchmark
    from reasonedit.eval.runner import write_image

    _gedit(tmp_path / "gedit", 6)
    bench = get_benchmark("gedit").load(tmp_path / "gedit")
    for i, s in enumerate(bench.samples()[:5]):  # k5 was never generated
        write_image(bench.output_path(tmp_path / "images", s, "other-model"), np.full((16, 16, 3), i, np.uint8))
    kill_at, calls, lock, release = 5, [], threading.Lock(), threading.Event()

    def respond(req):
        with lock:
            calls.append((req.text, tuple(req.image_urls)))
            blocked = len(calls) == kill_at + 1
        if blocked:
            release.wait(10)
        return '{"score": [7, 9], "reasoning": "ok"}'

    with ScriptedChatServer(respond, model="judge-x") as server:
        judge_id = f"judge-x@{server.base_url}"
        args = [sys.executable, "-m", "reasonedit", "eval", "--bench", "gedit", "--data", tmp_path / "gedit",
                "--images", tmp_path / "images", "--judge-url", server.base_url, "--judge-model", "judge-x",
                "--concurrency", "1", "--out", tmp_path / "out"]
        args = [str(a) for a in args]
        child = kill_when_seen(args, calls, kill_at + 1, timeout=60)
        release.set()
        assert len(calls) == kill_at + 1, child.stderr.read()
        resumed = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert len(calls) == 10 + 1  # 5 images x 2 queries, and the one in flight at the kill asked again
    assert len(set(calls)) == 10
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    report = doc["modes"]["other-model"]["report"]
    assert report["counts"] == {"total": 6, "ok": 5, "missing": 1, "failed": 0}
    assert doc["stamp"]["judge"] == judge_id and doc["stamp"]["temperature"] == 0.0
    assert "1 missing" in resumed.stderr and f"{kill_at} cached replies" in resumed.stderr


@pytest.mark.parametrize("extra, words", [
    (["--bench", "nope"], "unknown benchmark 'nope'"),
    (["--bench", "shapes", "--modes", "base,dream"], "--modes 'base,dream'"),
    (["--bench", "shapes", "--shard", "2/2"], "--shard '2/2'"),
    (["--bench", "shapes"], "give --model DIR, --editor URL, or --images DIR"),
    (["--bench", "shapes", "--editor", "http://127.0.0.1:9", "--modes", "think"], "needs a thinker"),
    (["--bench", "gedit"], "gedit: --data"),
])
def test_bad_input_is_named_and_exits_1(extra, words, tmp_path, capsys):
    assert main(["eval", *extra, "--out", str(tmp_path / "out"), "--limit", "1"]) == 1
    assert words in capsys.readouterr().err


def test_a_judged_benchmark_without_a_judge_names_the_flags(tmp_path, capsys, monkeypatch):
    for name in ("REASONEDIT_JUDGE_BASE_URL", "OPENAI_BASE_URL", "REASONEDIT_JUDGE_MODEL", "OPENAI_MODEL"):
        monkeypatch.delenv(name, raising=False)
    _gedit(tmp_path / "gedit", 1)
    (tmp_path / "images" / "m").mkdir(parents=True)
    code = main(["eval", "--bench", "gedit", "--data", str(tmp_path / "gedit"), "--images", str(tmp_path / "images"),
                 "--out", str(tmp_path / "out")])
    assert code == 1 and "--judge-url" in capsys.readouterr().err
