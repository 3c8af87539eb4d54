"""rl.prompts: the rl stage trains on the high-variance prompts `reasonedit data trajectories` wrote
(rl_prompts.jsonl) in place of its datasets: the real command on a tiny shapes dataset, then a few rl steps from
its file with the tiny models; a bad line names the file, the line and the field, and leaves nothing written."""

import json
import logging
import shutil

import pytest
import torch

from reasonedit.cli import main
from tests.test_rl_stage import DEMO, lora_start, lora_weights, rl_cfg  # noqa: F401  (the module-scoped fixture)
from tests.test_stages import start_model  # noqa: F401
from tests.test_trajectories import respond


@pytest.fixture(scope="module")
def trajectories(tmp_path_factory):
    """`reasonedit data trajectories` over 6 edit pairs with the shapes editor wrong on half its edits: every
    trajectory whose scores spread at all is an RL prompt (--rl-spread 0)."""
    from reasonedit.shapes.synth import SynthConfig, synthesize
    from reasonedit.shapes.world import ShapesWorld
    from reasonedit.testing import ScriptedChatServer

    root = tmp_path_factory.mktemp("rl_prompts")
    synthesize(root / "data", SynthConfig(n=6, seed=5, shard_size=50, splits=("train",), kinds=("edit_pair",)),
               ShapesWorld())
    with ScriptedChatServer(respond()) as chat:
        assert main(["data", "trajectories", "--data", str(root / "data"), "--out", str(root / "traj"), "--editor",
                     "shapes", "--editor-error-rate", "0.5", "--thinker", chat.base_url, "--thinker-model", "m",
                     "--rounds", "3", "--batch-size", "3", "--rl-spread", "0"]) == 0
    lines = [json.loads(line) for line in (root / "traj" / "rl_prompts.jsonl").read_text().splitlines()]
    assert len(lines) >= 2, "too few RL prompts for the test"
    return root / "traj"


def prompt_lines(folder):
    return [json.loads(line) for line in (folder / "rl_prompts.jsonl").read_text().splitlines()]


def recording(reward, seen):
    def record(rollouts):
        seen.extend(rollouts)
        return reward(rollouts)
    return record


def test_the_rl_stage_rolls_out_the_prompts_of_the_file_not_the_datasets(lora_start, small_dataset, trajectories,
                                                                        tmp_path):
    from reasonedit.eval.images import read_rgb
    from reasonedit.experiment import rl_reward, stage_sources
    from reasonedit.training import train_stage

    (tmp_path / "data").symlink_to(small_dataset)  # the run's own dataset is there, and must not be read
    cfg = rl_cfg(tmp_path, steps=2, extra=[f"rl.prompts={trajectories}"])
    data = stage_sources(cfg, "rl", tmp_path)
    [(derived, _)] = data
    assert derived.parent == tmp_path / "rl" and derived.name.startswith("prompts-")
    seen = []
    res = train_stage(cfg, "rl", lora_start, data, tmp_path / "rl", reward=recording(rl_reward(cfg), seen))
    assert res.steps == 2 and all(torch.isfinite(torch.tensor(h["grpo"])) for h in res.history)
    lines = {d["key"]: d for d in prompt_lines(trajectories)}
    assert seen and {r.role for r in seen} == {"think"}
    assert {r.meta["key"] for r in seen} <= set(lines)  # every rollout's record is one of the file's prompts
    for r in seen:
        line = lines[r.meta["key"]]
        assert r.key == f"{line['key']}/think" and r.meta["instruction"] == line["instruction"]
        assert (r.meta["image"] == read_rgb(trajectories / line["source"])).all()
        assert r.meta["meta"]["target_scene"] == line["meta"]["target_scene"]  # what the oracle reward scores by
    assert 0.0 <= min(h["score"] for h in res.history) and max(h["score"] for h in res.history) <= 1.0
    # the derived dataset is reused while the file is unchanged: not written again
    stamp = (derived / "manifest.json").stat().st_mtime_ns
    assert stage_sources(cfg, "rl", tmp_path) == data and (derived / "manifest.json").stat().st_mtime_ns == stamp


def test_reasonedit_train_takes_a_trajectories_folder_and_resumes_exactly(lora_start, trajectories, tmp_path,
                                                                         monkeypatch, caplog):
    """`reasonedit train --stage rl --data TRAJ_DIR` trains on its prompts; killed inside step 3 after checkpoint 2
    and run again, the curves and the LoRA equal the uninterrupted run's, bitwise."""
    from reasonedit.training import data as data_mod

    def command(root):
        return ["train", "--config", str(DEMO), "--stage", "rl", "--start", str(lora_start),
                "--data", str(trajectories), f"output_dir={root}", "rl.steps=3", "rl.warmup_steps=0", "rl.lr=5e-3",
                "rl.group_size=2", "rl.max_new_tokens=4", "rl.reasoner_budget=512", "rl.beta=0.5",
                "batches.window=4", "train.checkpoint_every=1", "train.keep_last=2"]

    assert main(command(tmp_path / "a")) == 0
    whole = json.loads((tmp_path / "a" / "rl" / "history.json").read_text())
    assert len(whole) == 3 and len(list((tmp_path / "a" / "rl").glob("prompts-*"))) == 1
    real_next, calls = data_mod.BatchStream.next, {"n": 0}

    class Crash(Exception):
        pass

    def crashing_next(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Crash()
        return real_next(self)

    monkeypatch.setattr(data_mod.BatchStream, "next", crashing_next)
    with pytest.raises(Crash):
        main(command(tmp_path / "b"))
    monkeypatch.setattr(data_mod.BatchStream, "next", real_next)
    with caplog.at_level(logging.INFO, logger="reasonedit.train"):
        assert main(command(tmp_path / "b")) == 0
    assert any("resumed from" in r.message and "at step 2" in r.message for r in caplog.records)
    assert json.loads((tmp_path / "b" / "rl" / "history.json").read_text()) == whole
    wa, wb = lora_weights(tmp_path / "a" / "rl" / "model"), lora_weights(tmp_path / "b" / "rl" / "model")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def broken_copy(trajectories, tmp_path, edit):
    """A copy of the trajectories folder whose rl_prompts.jsonl has its second line replaced by `edit(line)`."""
    folder = tmp_path / "traj"
    shutil.copytree(trajectories, folder)
    lines = (folder / "rl_prompts.jsonl").read_text().splitlines()
    lines[1] = edit(json.loads(lines[1]))
    (folder / "rl_prompts.jsonl").write_text("".join(line + "\n" for line in lines))
    return folder


def without(key):
    def edit(doc):
        doc.pop(key)
        return json.dumps(doc)
    return edit


def without_target(doc):
    doc["meta"].pop("target_scene")
    return json.dumps(doc)


def image_elsewhere(doc):
    doc["source"] = "images/nowhere/source.png"
    return json.dumps(doc)


@pytest.mark.parametrize("edit, field", [
    (lambda doc: json.dumps(doc)[:-7], "not JSON"),
    (without("instruction"), "field 'instruction' is missing"),
    (image_elsewhere, "field 'source': the image .*nowhere/source.png does not exist"),
    (without_target, r"field 'meta.target_scene' is missing; rl.reward=oracle"),
])
def test_a_bad_line_names_the_file_line_and_field_and_nothing_is_written(trajectories, tmp_path, edit, field):
    from reasonedit.experiment import stage_sources

    folder = broken_copy(trajectories, tmp_path, edit)
    cfg = rl_cfg(tmp_path / "run", extra=[f"rl.prompts={folder}"])
    with pytest.raises(ValueError, match=rf"{folder / 'rl_prompts.jsonl'}:2: {field}"):
        stage_sources(cfg, "rl", tmp_path / "run")
    assert not (tmp_path / "run" / "rl").exists()  # no derived dataset, whole or half


def test_without_a_target_scene_the_judge_reward_still_takes_the_prompts(trajectories, tmp_path):
    """rl.reward=judge scores a think reply from the source and the result alone: no target scene needed."""
    from reasonedit.data.shards import read_records
    from reasonedit.experiment import stage_sources

    folder = broken_copy(trajectories, tmp_path, without_target)
    cfg = rl_cfg(tmp_path / "run", extra=[f"rl.prompts={folder}", "rl.reward=judge",
                                          "rl.judge_url=http://127.0.0.1:9/v1"])
    [(derived, _)] = stage_sources(cfg, "rl", tmp_path / "run")
    records = list(read_records(derived, "train", "thinking_pair"))
    assert [r.key for r in records] == [d["key"] for d in prompt_lines(folder)]


def test_an_empty_file_or_a_missing_one_is_named(tmp_path, capsys):
    from reasonedit.experiment import stage_sources

    (tmp_path / "rl_prompts.jsonl").write_text("")
    cfg = rl_cfg(tmp_path / "run", extra=[f"rl.prompts={tmp_path}"])
    with pytest.raises(ValueError, match=rf"{tmp_path / 'rl_prompts.jsonl'}: holds no prompts.*--rl-spread"):
        stage_sources(cfg, "rl", tmp_path / "run")
    cfg = rl_cfg(tmp_path / "run", extra=[f"rl.prompts={tmp_path / 'nope'}"])
    with pytest.raises(FileNotFoundError, match=r"rl.prompts: .*nope does not exist"):
        stage_sources(cfg, "rl", tmp_path / "run")
    assert not (tmp_path / "run" / "rl").exists()
    cfg = rl_cfg(tmp_path / "run", extra=[f"rl.prompts={tmp_path}", "rl.roles=[decide]"])
    with pytest.raises(ValueError, match=r"rl.roles: .*must include think"):
        stage_sources(cfg, "rl", tmp_path / "run")
