"""The GRPO stage (`rl`): it trains the reasoner's LoRA on its own replies rewarded in the loop (the shapes editor and
oracle here), logs its figures, resumes exactly after a crash, names its bad config keys, and its rewards are what
moves the weights."""

import logging

import pytest
import torch

from reasonedit.config import RL_ROLES, ConfigError, load_config
from tests.conftest import ROOT
from tests.test_stages import start_model  # noqa: F401  (the module-scoped fixture)

DEMO = ROOT / "configs" / "experiment" / "shapes_tiny.yaml"
FIGURES = ("reward", "reward_std", "score", "parse_rate", "kl", "clip_fraction", "reply_length")


def rl_cfg(tmp_path, steps=2, extra=()):
    _, cfg = load_config(DEMO, [f"output_dir={tmp_path}", f"rl.steps={steps}", "rl.warmup_steps=0", "rl.lr=5e-3",
                                "rl.group_size=2", "rl.max_new_tokens=4", "rl.reasoner_budget=512", "rl.beta=0.5",
                                "batches.window=4", "train.log_every=1", *extra])
    return cfg


@pytest.fixture(scope="module")
def lora_start(start_model, tmp_path_factory):
    """The tiny model with a non-zero LoRA (B drawn), as a stage-1 model has: the policy differs from the reference
    (the adapter disabled), so the KL term moves the weights even where a random reasoner's rewards are all alike."""
    from reasonedit.models.model import ReasonEditModel

    model = ReasonEditModel.from_pretrained(start_model, lora_trainable=True)
    if model.reasoner.peft_model is None:
        model.reasoner.add_lora(model.config.reasoner.lora)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1)
        for name, p in model.reasoner.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    model.changed("reasoner")
    return model.save_pretrained(tmp_path_factory.mktemp("rl_start") / "model")


def lora_weights(path):
    from reasonedit.models.model import ReasonEditModel

    model = ReasonEditModel.from_pretrained(path, components=("reasoner",), lora_trainable=True)
    return {n: p.detach().clone() for n, p in model.reasoner.model.named_parameters() if "lora_" in n}


def test_rl_stage_trains_with_the_shapes_reward_and_logs_its_figures(lora_start, small_dataset, tmp_path, monkeypatch,
                                                                     caplog):
    from reasonedit.experiment import rl_reward
    from reasonedit.training import metrics, train_stage

    logged = []
    monkeypatch.setattr(metrics.MetricsSink, "log", lambda self, step, m: logged.append((step, dict(m))))
    cfg = rl_cfg(tmp_path, steps=2, extra=["rl.reference=base"])  # the start adapter trains on: a KL from step 1
    with caplog.at_level(logging.INFO, logger="reasonedit.train"):
        res = train_stage(cfg, "rl", lora_start, small_dataset, tmp_path / "rl", reward=rl_reward(cfg))
    assert res.steps == 2 and len(res.history) == 2
    for h in res.history:
        assert set(FIGURES) <= set(h) and torch.isfinite(torch.tensor(h["grpo"]))
        assert 0.0 <= h["parse_rate"] <= 1.0 and 1 <= h["reply_length"] <= 4 and h["kl"] > 0
    assert [s for s, _ in logged] == [1, 2] and all(f"rl/{f}" in m for _, m in logged for f in FIGURES)
    assert any("rl step 2/2" in r.message and "reward " in r.message for r in caplog.records)
    assert (tmp_path / "rl" / "curves.png").stat().st_size > 0
    before, after = lora_weights(lora_start), lora_weights(res.model)
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    assert (res.model / "generator").exists() or "generator" in (res.model / "reasonedit.json").read_text()


def by_text(rollouts):
    """A reward that tells a group's replies apart by their text, so advantages are non-zero."""
    from reasonedit.stages.rl import Reward

    return [Reward(float(sum(map(ord, r.reply)) % 7), False) for r in rollouts]


def test_several_updates_per_batch_make_the_clip_act_and_one_leaves_it_idle(lora_start, small_dataset, tmp_path):
    """rl.updates_per_batch=1: the ratio is exactly 1, nothing is clipped. 3: the second and third updates reuse the
    rollouts with the sampling policy's log-probs fixed, the ratio leaves [0.8, 1.2] and the clip acts; the lr
    schedule counts updates, not batches."""
    from reasonedit.training import train_stage
    from reasonedit.training.schedule import warmup_cosine

    extra = ["rl.beta=0", "rl.lr=5e-2", "rl.reference=base"]
    one = train_stage(rl_cfg(tmp_path / "one", extra=extra), "rl", lora_start, small_dataset,
                      tmp_path / "one" / "rl", reward=by_text)
    three = train_stage(rl_cfg(tmp_path / "three", extra=[*extra, "rl.updates_per_batch=3"]), "rl", lora_start,
                        small_dataset, tmp_path / "three" / "rl", reward=by_text)
    assert any(h["reward_std"] > 0 for h in one.history)
    assert all(h["clip_fraction"] == 0.0 for h in one.history)
    assert len(three.history) == 2 and any(h["clip_fraction"] > 0 for h in three.history)
    # the first batch is the same in both (same weights, same draws): the rewards and the first lr agree
    assert three.history[0]["reward"] == one.history[0]["reward"]
    assert [h["lr"] for h in three.history] == pytest.approx([5e-2 * warmup_cosine(s, 0, 6, 0.1) for s in (0, 3)])
    assert [h["lr"] for h in one.history] == pytest.approx([5e-2 * warmup_cosine(s, 0, 2, 0.1) for s in (0, 1)])


@pytest.mark.parametrize("updates", [1, 2])
def test_rl_resume_after_a_crash_equals_the_uninterrupted_run(lora_start, small_dataset, tmp_path, monkeypatch,
                                                              updates):
    from reasonedit.experiment import rl_reward
    from reasonedit.training import data as data_mod
    from reasonedit.training import train_stage

    extra = ["train.checkpoint_every=1", "train.keep_last=2", f"rl.updates_per_batch={updates}"]
    cfg_a = rl_cfg(tmp_path / "a", steps=3, extra=extra)
    whole = train_stage(cfg_a, "rl", lora_start, small_dataset, tmp_path / "a" / "rl", reward=rl_reward(cfg_a))
    real_next, calls = data_mod.BatchStream.next, {"n": 0}

    class Crash(Exception):
        pass

    def crashing_next(self):
        calls["n"] += 1
        if calls["n"] == 3:  # dies inside step 3, after checkpoint 2: what SIGKILL leaves behind
            raise Crash()
        return real_next(self)

    cfg = rl_cfg(tmp_path / "b", steps=3, extra=extra)
    monkeypatch.setattr(data_mod.BatchStream, "next", crashing_next)
    with pytest.raises(Crash):
        train_stage(cfg, "rl", lora_start, small_dataset, tmp_path / "b" / "rl", reward=rl_reward(cfg))
    monkeypatch.setattr(data_mod.BatchStream, "next", real_next)
    resumed = train_stage(cfg, "rl", lora_start, small_dataset, tmp_path / "b" / "rl", reward=rl_reward(cfg))
    assert resumed.history == whole.history  # losses and rollout figures, floats compared exactly
    wa, wb = lora_weights(whole.model), lora_weights(resumed.model)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_rewards_alone_move_the_weights_when_there_is_no_kl(lora_start, small_dataset, tmp_path):
    """beta=0: replies rewarded alike give zero advantages, so AdamW's update is exactly zero; rewards that tell the
    replies apart (by their text) move the LoRA."""
    from reasonedit.stages.rl import Reward
    from reasonedit.training import train_stage

    seen = []

    def constant(rollouts):
        seen.extend(rollouts)
        return [Reward(0.7, True) for _ in rollouts]

    extra = ["rl.beta=0", "train.weight_decay=0", "rl.reference=base"]  # the start model's adapter trains on
    flat = train_stage(rl_cfg(tmp_path / "c", extra=extra), "rl", lora_start, small_dataset, tmp_path / "c" / "rl",
                       reward=constant)
    assert seen and {r.role for r in seen} <= set(RL_ROLES) and all(r.meta["key"] in r.key for r in seen)
    assert all(h["reward_std"] == 0.0 and h["reward"] == pytest.approx(0.7 + 0.1) for h in flat.history)
    before = lora_weights(lora_start)
    assert all(torch.equal(before[k], v) for k, v in lora_weights(flat.model).items())
    moved = train_stage(rl_cfg(tmp_path / "d", extra=extra), "rl", lora_start, small_dataset, tmp_path / "d" / "rl",
                        reward=by_text)
    assert any(h["reward_std"] > 0 for h in moved.history)
    assert any(not torch.equal(before[k], v) for k, v in lora_weights(moved.model).items())


@pytest.mark.parametrize("key, value", [("group_size", 1), ("roles", "[think,paint]"), ("reference", "sft"), ("format_weight", -1),
                                        ("error_rate", 2), ("editor", "paint"), ("lr", 0), ("reasoner_budget", 100),
                                        ("updates_per_batch", 0)])
def test_rl_config_names_the_bad_key(key, value):
    with pytest.raises(ConfigError, match=rf"rl\.{key}:"):
        load_config(DEMO, [f"rl.{key}={value}"])


def test_the_rl_stage_needs_a_reward(lora_start, small_dataset, tmp_path):
    from reasonedit.training import train_stage

    with pytest.raises(ValueError, match="rl: needs a reward"):
        train_stage(rl_cfg(tmp_path), "rl", lora_start, small_dataset, tmp_path / "rl")


def test_the_demo_does_not_run_the_rl_step():
    for name in ("shapes_demo", "shapes_tiny"):
        _, cfg = load_config(ROOT / "configs" / "experiment" / f"{name}.yaml")
        assert "rl" not in cfg.steps
    from reasonedit.config import ExperimentConfig
    assert "rl" not in ExperimentConfig().steps


@pytest.mark.slow
def test_sigkill_of_reasonedit_train_stage_rl_then_resume_equals_the_uninterrupted_run(lora_start, small_dataset,
                                                                                       tmp_path):
    """As tests/test_train_resume_kill.py does for stage 2: SIGKILL at a random saved step and again mid-save,
    relaunch each time; the loss and reward curves and the final weights equal one uninterrupted run's, bitwise."""
    import random
    import sys

    from tests.test_train_resume_kill import run_and_kill, run_to_end, visible_steps

    steps = 6

    def command(out):
        return [sys.executable, "-m", "reasonedit", "train", "--config", str(DEMO), "--stage", "rl",
                "--start", str(lora_start), "--data", str(small_dataset), "--out", str(out),
                f"output_dir={out.parent}", f"rl.steps={steps}", "rl.warmup_steps=0", "rl.lr=5e-3", "rl.group_size=2",
                "rl.max_new_tokens=4", "rl.reasoner_budget=512", "rl.beta=0.5", "batches.window=4",
                "train.log_every=1", "train.checkpoint_every=1", "train.keep_last=2"]

    def final(out):
        import json
        last = visible_steps(out / "checkpoints")[-1]
        assert torch.load(last / "trainer.pt", weights_only=False)["step"] == steps
        return json.loads((out / "history.json").read_text()), torch.load(last / "model.pt", weights_only=False)

    whole_out, killed_out = tmp_path / "whole" / "rl", tmp_path / "killed" / "rl"
    with open(tmp_path / "whole.log", "w") as log:
        run_to_end(command(whole_out), log, whole_out / "checkpoints")
    seed = random.randrange(1 << 30)
    first = random.Random(seed).randint(1, 3)
    root = killed_out / "checkpoints"
    with open(tmp_path / "killed.log", "w") as log:
        reached = run_and_kill(command(killed_out), log, root, first)
        reached = run_and_kill(command(killed_out), log, root, reached + 2, mid_save=True)
        assert reached < steps, f"seed {seed}"
        run_to_end(command(killed_out), log, root)
    assert (tmp_path / "killed.log").read_text().count("resumed from") == 2
    (hist_a, ckpt_a), (hist_b, ckpt_b) = final(whole_out), final(killed_out)
    assert len(hist_a) == steps and hist_a == hist_b, f"seed {seed}: the curves differ"
    assert ckpt_a.keys() == ckpt_b.keys() and all(torch.equal(ckpt_a[k], ckpt_b[k]) for k in ckpt_a), f"seed {seed}"
    wa, wb = lora_weights(whole_out / "model"), lora_weights(killed_out / "model")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_wilson_interval_and_two_proportion_z_hand_values():
    from reasonedit.eval.rl_gain import Count, two_proportion_z

    low, high = Count(7, 10).interval()  # the textbook Wilson 95 % interval of 7 / 10
    assert low == pytest.approx(0.3968, abs=1e-4) and high == pytest.approx(0.8922, abs=1e-4)
    assert Count(0, 20).interval()[0] == 0.0 and Count(20, 20).interval()[1] == 1.0
    # 40 % -> 60 % of 100 each: pooled 0.5, sd sqrt(0.25 * 0.02) = 0.0707, z = 0.2 / 0.0707 = 2.83
    assert two_proportion_z(Count(40, 100), Count(60, 100)) == pytest.approx(2.8284, abs=1e-4)
    assert two_proportion_z(Count(60, 100), Count(40, 100)) == pytest.approx(-2.8284, abs=1e-4)
    assert two_proportion_z(Count(5, 5), Count(5, 5)) == 0.0


def test_the_rl_gain_compares_two_reasoners_on_the_same_held_out_samples(lora_start, small_dataset, world, tmp_path):
    from reasonedit.eval.rl_gain import FIGURES, compare_reasoners, gain_table

    doc = compare_reasoners({"sft": lora_start, "rl": lora_start}, small_dataset, world, tmp_path, n=3,
                            error_rate=0.3, rounds=2)
    assert set(doc["models"]) == {"sft", "rl"} and doc["n"] == 3 and doc["error_rate"] == 0.3
    for name in ("sft", "rl"):
        for f in FIGURES:
            m = doc["models"][name][f]
            assert m["n"] == 3 and 0 <= m["right"] <= 3 and m["low"] <= m["rate"] <= m["high"]
    # the same reasoner, greedy, on the same samples: the same counts, no change
    assert doc["models"]["sft"] == doc["models"]["rl"]
    assert all(c["delta"] == 0.0 and c["z"] == 0.0 and not c["outside_noise"] for c in doc["changes"]["rl"].values())
    table = gain_table(doc)
    assert table.count("\n") == 1 + len(FIGURES) and "think_reflect success" in table and "/3)" in table


def test_edit_and_eval_take_the_rl_model_when_it_carries_a_generator(tmp_path):
    import json

    from reasonedit.experiment import latest_model

    def model(where, components):
        (tmp_path / where).mkdir(parents=True)
        (tmp_path / where / "reasonedit.json").write_text(json.dumps({"components": components}))

    model("stage3/model", ["reasoner", "generator", "vae"])
    model("rl/model", ["reasoner"])  # rl after stage 1 only: no generator to edit with
    assert latest_model(tmp_path) == tmp_path / "stage3" / "model"
    (tmp_path / "rl" / "model" / "reasonedit.json").write_text(json.dumps({"components": ["reasoner", "generator",
                                                                                          "vae"]}))
    assert latest_model(tmp_path) == tmp_path / "rl" / "model"


def test_the_shapes_reward_of_each_role_by_hand(world):
    from reasonedit.experiment import ShapesReward
    from reasonedit.stages.rl import Rollout

    target = "A navy background with 2 shapes: a small red circle at row 1, column 2; a large blue square in the " \
             "top-left corner."
    meta = {"target_description": target, "score": 7, "decision": "reflection", "meta": {}}
    reward = ShapesReward(world)
    got = reward([
        Rollout("describe", "k/describe", meta, target),  # every part right
        Rollout("describe", "k/describe", meta, "A navy background with 1 shape: a small red circle at row 1, "
                "column 2."),  # 2 of 3 parts, none extra
        Rollout("describe", "k/describe", meta, "A black background with 1 shape: a small green star at row 4, "
                "column 4."),  # none right: 0 of the 5 parts named by either
        Rollout("describe", "k/describe", meta, "no idea"),
        Rollout("score", "k/score", meta, "score: 7\nreason: the square should be red"),
        Rollout("score", "k/score", meta, "score: 10\nreason: fine"),
        Rollout("score", "k/score", meta, "seven"),
        Rollout("decide", "k/decide", meta, "<#Reflection> almost. Make the square red."),
    ])
    assert [round(r.value, 4) for r in got[:4]] == [1.0, round(2 / 3, 4), 0.0, 0.0]
    assert [r.parsed for r in got[:4]] == [True, True, True, False]
    assert [(r.value, r.parsed) for r in got[4:7]] == [(1.0, True), (0.7, True), (0.0, False)]


def test_the_reference_is_the_start_model_itself(lora_start, small_dataset, tmp_path):
    """rl.reference=start (the default): the start model's adapter is merged into the base and a fresh one trains, so
    the reasoner with its adapter disabled, the KL's reference, computes what the start model computes, and the
    policy starts equal to it (KL 0; with rewards alike nothing moves it)."""
    from reasonedit.models.model import ReasonEditModel
    from reasonedit.stages.rl import Reward
    from reasonedit.training import train_stage

    res = train_stage(rl_cfg(tmp_path, steps=2), "rl", lora_start, small_dataset, tmp_path / "rl",
                      reward=lambda rollouts: [Reward(0.5, True) for _ in rollouts])
    assert all(h["kl"] == pytest.approx(0.0, abs=1e-6) for h in res.history)
    start = ReasonEditModel.from_pretrained(lora_start, components=("reasoner",)).reasoner
    trained = ReasonEditModel.from_pretrained(res.model, components=("reasoner",)).reasoner
    assert all(not p.abs().any() for n, p in trained.model.named_parameters() if "lora_B" in n)
    prompt = start.processor.encode_one([{"role": "user", "content": [{"type": "text",
                                                                       "text": "make the red circle blue"}]}])
    with torch.no_grad():
        want = start.model(**prompt).logits
        with trained.peft_model.disable_adapter():
            got = trained.model(**prompt).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_the_think_reward_is_the_progress_from_the_source(world):
    """An unparsable thought leaves the source, which already scores 6-7 of 10: it earns 0; the exact thought 1."""
    from reasonedit.experiment import ShapesReward, progress
    from reasonedit.shapes.synth import Synthesizer
    from reasonedit.stages.rl import Rollout, rollout_meta

    assert progress(7, 4) == 0.5 and progress(3, 4) == 0.0 and progress(10, 10) == 1.0 and progress(7, 10) == 0.0
    record = Synthesizer(world, seed=3).thinking_pair("test", 0)
    meta = rollout_meta(record)
    right, nothing = ShapesReward(world)([Rollout("think", "k/think", meta, record.concrete_instruction),
                                          Rollout("think", "k/think", meta, "no idea at all")])
    assert (right.value, right.parsed) == (1.0, True) and (nothing.value, nothing.parsed) == (0.0, False)


def test_think_replies_run_through_the_start_models_generator_or_an_editing_service(lora_start, small_dataset, world,
                                                                                   tmp_path):
    """rl.editor=model: the start model's generator executes each think reply, the oracle scores what it drew; an
    http URL: the editing service does (here `reasonedit serve --editor shapes`, exact, so the record's own
    concrete instruction earns 1)."""
    from reasonedit.experiment import rl_reward
    from reasonedit.shapes.synth import Synthesizer
    from reasonedit.stages.rl import Rollout, rollout_meta
    from reasonedit.training import train_stage
    from tests.conftest import start_serve

    cfg = rl_cfg(tmp_path, steps=1, extra=["rl.editor=model", "eval.sampling_steps=2", "rl.roles=[think]"])
    reward = rl_reward(cfg, lora_start)
    record = Synthesizer(world, seed=3).thinking_pair("test", 0)
    meta = rollout_meta(record)
    drawn = reward([Rollout("think", "k/think", meta, record.concrete_instruction)])[0]
    assert 0.0 <= drawn.value <= 1.0 and drawn.parsed  # a random generator draws what it draws; the reply parses
    res = train_stage(cfg, "rl", lora_start, small_dataset, tmp_path / "rl", reward=reward)
    assert res.steps == 1 and 0.0 <= res.history[0]["reward"] <= 1.1

    proc, url = start_serve("--editor", "shapes", "--no-auth")
    try:
        _, by_url = load_config(DEMO, [f"output_dir={tmp_path}", f"rl.editor={url}"])
        served = rl_reward(by_url)([Rollout("think", "k/think", meta, record.concrete_instruction),
                                    Rollout("think", "k/think", meta, "no idea")])
    finally:
        proc.kill()
        proc.wait()
    assert [(r.value, r.parsed) for r in served] == [(1.0, True), (0.0, False)]
    with pytest.raises(ConfigError, match="rl.error_rate"):
        load_config(DEMO, [f"output_dir={tmp_path}", "rl.editor=model", "rl.error_rate=0.3"])
    with pytest.raises(ConfigError, match="rl.editor"):
        load_config(DEMO, [f"output_dir={tmp_path}", "rl.editor=paint"])


def _rl_under(root, start, data, ranks, grad_accum, parallel, extra=()):
    """`reasonedit train --stage rl` as a user launches it, on `ranks` gloo ranks (torchrun) or in one process."""
    import json
    import os
    import subprocess
    import sys

    (root / "stage1").mkdir(parents=True)
    (root / "stage1" / "model").symlink_to(start)
    (root / "data").symlink_to(data)
    args = ["train", "--config", str(DEMO), "--stage", "rl", f"output_dir={root}", "rl.steps=2", "rl.warmup_steps=0",
            "rl.lr=5e-3", "rl.group_size=2", "rl.max_new_tokens=4", "rl.reasoner_budget=512", "rl.beta=0.5",
            "rl.reference=base", "batches.window=4", "train.log_every=1", f"rl.grad_accum={grad_accum}",
            f"train.parallel={parallel}", *extra]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--standalone",
                 "-m", "reasonedit"] if ranks > 1 else [sys.executable, "-m", "reasonedit"])
    res = subprocess.run([*launcher, *args], cwd=ROOT, capture_output=True, text=True, timeout=240,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    return json.loads((root / "rl" / "history.json").read_text()), lora_weights(root / "rl" / "model"), res.stderr


@pytest.mark.parametrize("updates", [1, 2])
def test_rl_on_two_ddp_ranks_equals_one_process(lora_start, small_dataset, tmp_path, updates):
    """Global micro-batch g goes to rank g % 2 and its rollouts are drawn from (seed, step, g): one process with 2
    micro-batches per step samples, rewards and updates what 2 ranks with 1 each do (figures all-reduced), with
    one update per batch of rollouts or several."""
    extra = [f"rl.updates_per_batch={updates}"]
    one, w_one, _ = _rl_under(tmp_path / "one", lora_start, small_dataset, 1, 2, "none", extra)
    two, w_two, log = _rl_under(tmp_path / "two", lora_start, small_dataset, 2, 1, "ddp", extra)
    assert "ddp on 2 rank(s)" in log
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        for k in ("grpo", *FIGURES):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-5), (k, a[k], b[k])
    assert w_one.keys() == w_two.keys()
    assert max((w_one[k] - w_two[k]).abs().max().item() for k in w_one) <= 1e-5


def _judge_cfg(tmp_path, url, extra=()):
    return rl_cfg(tmp_path, steps=1, extra=["rl.reward=judge", f"rl.judge_url={url}", "rl.judge_model=judge-x",
                                            "rl.roles=[think]", *extra])


def _changed(req) -> str:
    """The fake judge: 9 of 10 when the result differs from the source, else 2."""
    source, edited = req.images()
    return "score: 9\nreason: done" if (source != edited).any() else "score: 2\nreason: nothing changed"


def test_the_judge_reward_scores_each_executed_thought_over_loopback_with_bounded_concurrency(world, tmp_path):
    """rl.reward=judge: the editor executes each think reply, the judge (a real HTTP server on loopback) is sent
    the record's instruction with the source and the result, its `score: N` / 10 is the reward; every rollout of
    the batch is asked at once, never more than rl.judge_concurrency in flight."""
    from reasonedit.experiment import rl_reward
    from reasonedit.shapes.synth import Synthesizer
    from reasonedit.stages.rl import Rollout, rollout_meta
    from reasonedit.testing.chat_server import Reply, ScriptedChatServer

    record = Synthesizer(world, seed=3).thinking_pair("test", 0)
    meta = rollout_meta(record)
    with ScriptedChatServer(lambda req: Reply(_changed(req), delay=0.05)) as server:
        reward = rl_reward(_judge_cfg(tmp_path, server.base_url, ["rl.judge_concurrency=2"]))
        try:
            got = reward([Rollout("think", f"k{i}/think", meta, record.concrete_instruction if i % 2 else
                                  f"no idea {i}") for i in range(6)])
        finally:
            reward.close()
    assert [(r.value, r.parsed) for r in got] == [(0.2, False), (0.9, True)] * 3
    # the two distinct questions (right thought, unchanged source) are each sent once: identical ones are merged
    assert server.requests == 2 and server.max_in_flight <= 2
    assert all(record.abstract_instruction in req.text and len(req.image_urls) == 2 for req in server.log)
    assert {req.model for req in server.log} == {"judge-x"}


def test_rl_trains_with_the_judge_reward(lora_start, small_dataset, tmp_path):
    from reasonedit.experiment import rl_reward
    from reasonedit.testing.chat_server import ScriptedChatServer
    from reasonedit.training import train_stage

    with ScriptedChatServer(_changed) as server:
        cfg = _judge_cfg(tmp_path, server.base_url)
        reward = rl_reward(cfg)
        try:
            res = train_stage(cfg, "rl", lora_start, small_dataset, tmp_path / "rl", reward=reward)
        finally:
            reward.close()
    assert res.steps == 1 and server.requests > 0
    assert 0.2 - 1e-6 <= res.history[0]["score"] <= 0.9 + 1e-6  # the judge's 2 (source returned) or 9 (changed), / 10
    assert (tmp_path / "rl" / "judge_cache.jsonl").stat().st_size > 0  # a resumed run does not pay twice


def test_the_judge_reward_names_its_key_when_the_url_is_missing_or_unreachable(world, tmp_path):
    import socket

    from reasonedit.errors import RemoteServiceError
    from reasonedit.experiment import rl_reward
    from reasonedit.shapes.synth import Synthesizer
    from reasonedit.stages.rl import Rollout, rollout_meta

    with pytest.raises(ConfigError, match=r"rl\.judge_url:.*rl\.reward=judge"):
        load_config(DEMO, [f"output_dir={tmp_path}", "rl.reward=judge"])
    with pytest.raises(ConfigError, match=r"rl\.reward:"):
        load_config(DEMO, [f"output_dir={tmp_path}", "rl.reward=vibes"])
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reward = rl_reward(_judge_cfg(tmp_path, f"http://127.0.0.1:{port}/v1",
                                  ["rl.judge_retries=0", "rl.judge_timeout=2"]))
    record = Synthesizer(world, seed=3).thinking_pair("test", 0)
    try:
        with pytest.raises(RemoteServiceError, match=rf"rl\.judge_url: the judge gave no reply to 1 of 1 .*{port}"):
            reward([Rollout("think", "k/think", rollout_meta(record), record.concrete_instruction)])
    finally:
        reward.close()
