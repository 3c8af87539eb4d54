"""Trajectories: the filter on hand-built trajectories (kept, truncated, unrolled, balanced sets worked out by
hand), and `reasonedit data trajectories` end to end with the exact shapes editor, the oracle and a scripted chat
thinker, killed and resumed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reasonedit.cli import main
from reasonedit.data.shards import read_records
from reasonedit.data.trajectories import (FilterSettings, Trajectory, TrajectoryRound, append_trajectory, balance,
                                          filter_trajectories, read_trajectories, recover)
from reasonedit.models import prompts
from reasonedit.testing import ScriptedChatServer

ROOT = Path(__file__).resolve().parents[1]


def T(key, scores, edited_from=None, instructions=None, thought="do it"):
    edited_from = edited_from or ["source"] + ["previous"] * (len(scores) - 1)
    instructions = instructions or [f"{key} step {i + 1}" for i in range(len(scores))]
    rounds = [TrajectoryRound(i + 1, instructions[i], f"images/{key}/round_{i + 1}.png", edited_from[i], s)
              for i, s in enumerate(scores)]
    return Trajectory(key, f"request {key}", thought, f"images/{key}/source.png", rounds)


HAND = [
    T("A", [10]),                                        # one round, right at once
    T("B", [7, 10, 7]),                                  # fixed by a reflection, then spoiled
    T("C", [7, 4, 4]),                                   # never as good as its first round
    T("D", [4, 4, 7], ["source"] * 3, ["same"] * 3),     # restarts with the same instruction
    T("E", [0, 10]),                                     # spread 10: high variance
    T("F", [4, 7], ["source", "source"], ["first", "second"]),  # a restart with a new instruction
]


def test_filter_gives_the_hand_computed_kept_truncated_and_unrolled_sets():
    r = filter_trajectories(HAND, FilterSettings(rl_spread=5, balance=False))
    assert [t.key for t in r.rl] == ["E"]
    assert [t.key for t in r.kept] == ["A", "B", "D", "F"] and r.dropped == ["C"]
    assert {t.key: [x.score for x in t.rounds] for t in r.truncated} == {
        "A": [10], "B": [7, 10], "D": [4, 4, 7], "F": [4, 7]}
    assert [(s.key, s.decision, s.new_instruction, s.restart) for s in r.unrolled] == [
        ("A_r1", "Success", "", False), ("A_think", "", "", False),
        ("B_r1", "Reflection", "B step 2", False), ("B_r2", "Success", "", False),
        ("D_r1", "Failed", "", False), ("D_r2", "Failed", "", False), ("D_r3", "Failed", "", False),
        ("F_r1", "Reflection", "second", True), ("F_r2", "Failed", "", False)]


def test_balance_downsamples_the_larger_classes_to_the_ratio_deterministically():
    unrolled = filter_trajectories(HAND, FilterSettings(rl_spread=5, balance=False)).unrolled
    even = balance(unrolled, (1, 1, 1), seed=3)
    kept = {s.key for s in even}
    assert {"A_r1", "B_r2", "B_r1", "F_r1", "A_think"} <= kept  # 2 Success, 2 Reflection, the thinking pair
    failed = kept & {"D_r1", "D_r2", "D_r3", "F_r2"}
    assert len(failed) == 2 and len(even) == 7
    assert [s.key for s in balance(unrolled, (1, 1, 1), seed=3)] == [s.key for s in even]
    assert [s.key for s in even] == [s.key for s in unrolled if s.key in kept]  # order kept
    skewed = balance(unrolled, (2, 1, 1), seed=3)  # unit = min(2/2, 2/1, 4/1) = 1
    counts = {d: sum(s.decision == d for s in skewed) for d in ("Success", "Reflection", "Failed")}
    assert counts == {"Success": 2, "Reflection": 1, "Failed": 1}


def test_a_torn_last_line_is_cut_off_and_whole_lines_read_back(tmp_path):
    path = tmp_path / "t.jsonl"
    for t in HAND[:2]:
        append_trajectory(path, t)
    with open(path, "ab") as f:
        f.write(HAND[2].to_line().encode()[:40])  # killed mid-line
    assert [t.key for t in read_trajectories(path)] == ["A", "B"]
    assert recover(path) == 40 and recover(path) == 0
    assert [t.rounds for t in read_trajectories(path)] == [HAND[0].rounds, HAND[1].rounds]


# -- end to end -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from reasonedit.shapes.synth import SynthConfig, synthesize
    from reasonedit.shapes.world import ShapesWorld
    out = tmp_path_factory.mktemp("traj") / "data"
    synthesize(out, SynthConfig(n=12, seed=5, shard_size=50, splits=("train",), kinds=("edit_pair",)), ShapesWorld())
    return out


def respond(delay=0.0):
    """Think echoes the request; every verdict is Failed, so each round restarts from the source with new noise."""
    def answer(req):
        time.sleep(delay)
        role = next(r for r, task in prompts.ROLE_TASKS.items() if req.text.startswith(task + "\n"))
        if role == "think":
            return req.text.split("Request: ", 1)[1]
        return {"describe": "the target", "score": "score: 5\nreason: unsure",
                "decide": "<#Think> not sure <#Failed>"}[role]
    return answer


def args(data, out, url, *extra):
    return ["data", "trajectories", "--data", str(data), "--out", str(out), "--editor", "shapes",
            "--editor-error-rate", "0.5", "--thinker", url, "--thinker-model", "m", "--rounds", "3",
            "--batch-size", "2", "--rl-spread", "6", *extra]


def test_a_run_records_every_round_and_writes_sft_shards_and_rl_prompts(data, tmp_path, capsys):
    out = tmp_path / "out"
    with ScriptedChatServer(respond()) as chat:
        assert main(args(data, out, chat.base_url)) == 0
    lines = read_trajectories(out / "trajectories.jsonl")
    assert sorted(t.key for t in lines) == sorted(r.key for r in read_records(data, "train", "edit_pair"))
    for t in lines:
        assert 1 <= len(t.rounds) <= 3 and all((out / r.image).is_file() for r in t.rounds)
        assert all(r.decision == "failed" and r.score in (10, 7, 4, 1, 0) for r in t.rounds)
    assert len({r.score for t in lines for r in t.rounds}) > 1  # the error rate shows in the oracle's scores
    report = json.loads((out / "filter.json").read_text())
    sft = list(read_records(out / "sft", "train"))
    refl = [r for r in sft if r.KIND == "reflection"]
    assert len(refl) == sum(report["balanced"].values()) > 0
    assert {r.decision for r in refl} <= {"Success", "Reflection", "Failed"}
    rl = (out / "rl_prompts.jsonl").read_text().splitlines()
    assert len(rl) == report["rl_prompts"] and report["rl_prompts"] + report["stable"] == len(lines)
    assert "RL prompts" in capsys.readouterr().out


def test_bad_input_names_the_flag_and_writes_nothing(data, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(args(data, out, "http://127.0.0.1:9/v1", "--balance", "3:1")) == 1
    assert "--balance" in capsys.readouterr().err and not out.exists()
    assert main(args(data, out, "http://127.0.0.1:9/v1", "--kinds", "reflection")) == 1
    assert "--kinds" in capsys.readouterr().err


def test_a_killed_run_resumes_without_duplicating_a_trajectory(data, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with ScriptedChatServer(respond(delay=0.03)) as chat:
        proc = subprocess.Popen([sys.executable, "-m", "reasonedit", *args(data, out, chat.base_url)], cwd=ROOT,
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        path, deadline = out / "trajectories.jsonl", time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if path.is_file() and path.read_text().count("\n") >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        before = path.read_text().count("\n")
        assert 3 <= before < 12
        with open(path, "a") as f:
            f.write('{"key": "train_edit_00')  # as if the kill had torn a line
        assert main(args(data, out, chat.base_url)) == 0
    keys = [t.key for t in read_trajectories(path)]
    assert len(keys) == len(set(keys)) == 12
    assert path.read_text().endswith("\n")


def test_shards_split_the_records_and_the_final_run_only_filters(data, tmp_path, capsys):
    out = tmp_path / "out"
    with ScriptedChatServer(respond()) as chat:
        for i in range(2):
            assert main(args(data, out, chat.base_url, "--shard", f"{i}/2")) == 0
        assert not (out / "sft").exists()
        parts = [read_trajectories(out / f"trajectories.part-{i}-of-2.jsonl") for i in range(2)]
        assert [len(p) for p in parts] == [6, 6] and not {t.key for t in parts[0]} & {t.key for t in parts[1]}
        asked = chat.requests
        assert main(args(data, out, chat.base_url)) == 0
        assert chat.requests == asked  # nothing run again
    assert "0 trajectories collected, 12 already there" in capsys.readouterr().err
    assert (out / "sft" / "manifest.json").is_file() and not (out / "trajectories.jsonl").exists()
    assert json.loads((out / "filter.json").read_text())["stable"] + json.loads(
        (out / "filter.json").read_text())["rl_prompts"] == 12
