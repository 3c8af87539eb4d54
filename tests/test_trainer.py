"""The trainer runtime: exact resume after a crash, non-finite losses skipped then stopping, the schedule, held-out
evaluations, condition caches, split streams (the host reads and collectives a step makes: test_step_syncs.py)."""

import pytest
import torch

from reasonedit.training.schedule import warmup_cosine
from tests.test_stages import stage_cfg, start_model  # noqa: F401  (the module-scoped fixture)


class Crash(Exception):
    pass


def weights(path):
    from safetensors.torch import load_file
    return load_file(str(path / "generator" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("workers", [0, 2])  # 2: records preprocessed in the loader's worker processes
def test_resume_after_a_crash_equals_the_uninterrupted_run(start_model, small_dataset, tmp_path, monkeypatch, workers):
    from reasonedit.training import data as data_mod
    from reasonedit.training import train_stage

    extra = ["train.checkpoint_every=1", "train.keep_last=2", f"train.num_workers={workers}"]
    whole = train_stage(stage_cfg(tmp_path / "a", 2, steps=4, extra=extra), 2, start_model, small_dataset,
                        tmp_path / "a" / "stage2")
    real_next, calls = data_mod.BatchStream.next, {"n": 0}

    def crashing_next(self):
        calls["n"] += 1
        if calls["n"] == 3:  # dies inside step 3, after checkpoint 2: what SIGKILL leaves behind
            raise Crash()
        return real_next(self)

    cfg = stage_cfg(tmp_path / "b", 2, steps=4, extra=extra)
    monkeypatch.setattr(data_mod.BatchStream, "next", crashing_next)
    with pytest.raises(Crash):
        train_stage(cfg, 2, start_model, small_dataset, tmp_path / "b" / "stage2")
    assert not list((tmp_path / "b" / "stage2" / "checkpoints").glob(".*partial"))
    monkeypatch.setattr(data_mod.BatchStream, "next", real_next)
    resumed = train_stage(cfg, 2, start_model, small_dataset, tmp_path / "b" / "stage2")
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history]
    wa, wb = weights(whole.model), weights(resumed.model)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_non_finite_losses_are_skipped_then_stop_the_run(start_model, small_dataset, tmp_path, monkeypatch):
    from reasonedit.stages.editing import EditingStage
    from reasonedit.training import TrainingStopped, train_stage

    real = EditingStage.loss_sums

    def nan_loss(self, model, batch, ctx):
        out = real(self, model, batch, ctx)
        out["fm"].sum = out["fm"].sum * float("nan")
        return out

    monkeypatch.setattr(EditingStage, "loss_sums", nan_loss)
    cfg = stage_cfg(tmp_path, 2, steps=5, extra=["train.max_bad_steps=2"])
    with pytest.raises(TrainingStopped, match="2 non-finite losses in a row"):
        train_stage(cfg, 2, start_model, small_dataset, tmp_path / "stage2")


def test_warmup_then_cosine():
    assert warmup_cosine(0, 4, 20, 0.1) == pytest.approx(0.25)
    assert warmup_cosine(3, 4, 20, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(4, 4, 20, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(20, 4, 20, 0.1) == pytest.approx(0.1)


def test_resume_refuses_a_changed_config_naming_the_keys_unless_allowed(start_model, small_dataset, tmp_path):
    from reasonedit.config import ConfigError
    from reasonedit.training import train_stage

    out = tmp_path / "stage2"
    train_stage(stage_cfg(tmp_path, 2, steps=1), 2, start_model, small_dataset, out)
    changed = ["stage2.lr=1e-3", "batches.window=4", "train.log_every=7"]  # the last one is free to change
    with pytest.raises(ConfigError) as err:
        train_stage(stage_cfg(tmp_path, 2, steps=1, extra=changed), 2, start_model, small_dataset, out)
    message = str(err.value)
    assert "stage2.lr: 0.003 -> 0.001" in message and "batches.window: 8 -> 4" in message
    assert "log_every" not in message and "train.allow_config_change=true" in message
    res = train_stage(stage_cfg(tmp_path, 2, steps=1, extra=[*changed, "train.allow_config_change=true"]), 2,
                      start_model, small_dataset, out)
    assert res.steps == 1 and res.model is not None


def test_held_out_evaluations_run_every_eval_every_steps_and_survive_a_resume(start_model, small_dataset, tmp_path,
                                                                             monkeypatch):
    import json

    from reasonedit.training import data as data_mod
    from reasonedit.training import train_stage

    seen = []

    def evaluate(model):
        assert not model.training  # figures are measured in eval mode, and training goes on in train mode after
        seen.append(sum(float(p.sum()) for p in model.generator.parameters()))
        return {"score": float(len(seen))}

    extra = ["train.eval_every=2", "train.checkpoint_every=2"]
    cfg = stage_cfg(tmp_path, 2, steps=4, extra=extra)
    real_next, calls = data_mod.BatchStream.next, {"n": 0}

    def crashing_next(self):
        calls["n"] += 1
        if calls["n"] == 4:  # inside step 4, after the evaluation and checkpoint of step 2
            raise Crash()
        return real_next(self)

    monkeypatch.setattr(data_mod.BatchStream, "next", crashing_next)
    with pytest.raises(Crash):
        train_stage(cfg, 2, start_model, small_dataset, tmp_path / "stage2", evaluate=evaluate)
    monkeypatch.setattr(data_mod.BatchStream, "next", real_next)
    res = train_stage(cfg, 2, start_model, small_dataset, tmp_path / "stage2", evaluate=evaluate)
    assert [e["step"] for e in res.evals] == [0, 2, 4]  # step 2 not evaluated again after the resume
    assert len(seen) == 3 and len(set(seen)) == 3  # 0 and 2 before the crash, 4 after: none measured twice
    written = json.loads((tmp_path / "stage2" / "evals.json").read_text())
    assert written == res.evals
    assert len(json.loads((tmp_path / "stage2" / "history.json").read_text())) == 4


def test_the_stage_that_declares_a_condition_cache_trains_through_it(start_model, small_dataset, tmp_path):
    from reasonedit.stages import STAGES
    from reasonedit.training import train_stage

    assert [n for n, s in STAGES.items() if s.uses_condition_cache] == [2]  # the stage with a frozen reasoner
    runs = {}
    for name, extra in (("plain", ["stage2.condition_cache=false"]), ("cached", [])):  # the cache is the default
        runs[name] = train_stage(stage_cfg(tmp_path / name, 2, steps=2, extra=extra), 2, start_model, small_dataset,
                                 tmp_path / name / "stage2")
    entries = list((tmp_path / "cached" / "stage2" / "condition_cache").rglob("*.safetensors"))
    assert entries and not (tmp_path / "plain" / "stage2" / "condition_cache").exists()
    # every segment goes through the cache, so a batch's misses are packed as the plain run packs them: equal bits
    assert [h["loss"] for h in runs["cached"].history] == [h["loss"] for h in runs["plain"].history]


def test_a_checkpoint_of_another_model_layout_is_refused_not_half_loaded(start_model, small_dataset, tmp_path):
    from reasonedit.training import train_stage

    out = tmp_path / "stage2"
    train_stage(stage_cfg(tmp_path, 2, steps=1, extra=["train.checkpoint_every=1"]), 2, start_model, small_dataset,
                out)
    (latest,) = sorted((out / "checkpoints").glob("step_*"))
    state = torch.load(latest / "model.pt", weights_only=False)
    torch.save({k.replace("generator.", "generator_old.", 1): v for k, v in state.items()}, latest / "model.pt")
    with pytest.raises(KeyError, match=r"saved parameters are not in the model, e.g. \[.*generator_old\."):
        train_stage(stage_cfg(tmp_path, 2, steps=1, extra=["train.checkpoint_every=1"]), 2, start_model,
                    small_dataset, out)



def split_streams(data, mix, streams, world_size):
    """Each rank's SplitBatchStream over `data`, with one-record batches that carry the record's key."""
    from types import SimpleNamespace

    from reasonedit.data.packing import Packer
    from reasonedit.training.data import BatchStream, SplitBatchStream, stage_loader

    def make(part, parts):
        return BatchStream(stage_loader(data, mix, seed=0, shuffle_buffer=4, part=part, parts=parts),
                           Packer(128, window=1), lambda r: [SimpleNamespace(num_tokens=128, key=r.key)])
    return [SplitBatchStream(make, streams, rank, world_size) for rank in range(world_size)]


def test_split_streams_give_each_rank_its_own_records_and_every_record_once(small_dataset):
    from reasonedit.data.shards import read_records

    every = sorted(r.key for r in read_records(small_dataset, split="train", kind="edit_pair"))
    ranks = split_streams(small_dataset, {"edit_pair": 1.0}, streams=2, world_size=2)
    seen = []
    for rank in ranks:
        (s, stream), = rank.streams.items()
        share = stream.loader.samples_per_rank(0)["edit_pair"][s]  # the records of this stream's shards, epoch 0
        seen.append([b.items[0].key for b in (rank.next() for _ in range(share))])
        assert rank.records == share, "a rank read records that are not its own"
    assert sorted(seen[0] + seen[1]) == every  # every record once, on exactly one rank
    assert 0 < len(seen[0]) < len(every) and 0 < len(seen[1]) < len(every)


def test_split_streams_hand_out_the_batches_one_process_would(small_dataset):
    """Global batch g comes from stream g % S: two ranks take, between them, one process's sequence."""
    mix = {"edit_pair": 1.0, "text_to_image": 1.0}
    one, = split_streams(small_dataset, mix, streams=2, world_size=1)
    two = split_streams(small_dataset, mix, streams=2, world_size=2)
    single = [one.next().items[0].key for _ in range(8)]
    totals = one.loader_stats  # what the stage reports: this process's two streams, summed
    assert totals.yielded == {k: sum(s.loader.stats().yielded[k] for s in one.streams.values()) for k in mix}
    assert sum(totals.yielded.values()) == one.records and totals.skipped == {k: {} for k in mix}
    split = [two[g % 2].next().items[0].key for g in range(8)]
    assert split == single
    state = two[1].state_dict()
    after = [two[1].next().items[0].key for _ in range(3)]
    again, = [r for r in split_streams(small_dataset, mix, streams=2, world_size=2)[1:]]
    again.load_state_dict(state)
    assert [again.next().items[0].key for _ in range(3)] == after
    with pytest.raises(ValueError, match="cannot be split over 2 ranks"):
        split_streams(small_dataset, mix, streams=3, world_size=2)


def test_fsdp2_computes_in_bf16_reduces_in_float32_on_cuda_and_offloads_when_asked(monkeypatch):
    """What `wrap` hands to FSDP2's fully_shard, recorded (CI has no GPU): the mixed-precision policy on CUDA
    under train.fsdp_mixed_precision=auto, none on a CPU, and the CPU offload policy with train.cpu_offload."""
    import torch.distributed.fsdp as fsdp

    from reasonedit.training.distributed import World, wrap

    class GeneratorBlock(torch.nn.Linear):
        pass

    calls = []
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, **kw: calls.append(kw) or module)
    module = torch.nn.Sequential(GeneratorBlock(4, 4), GeneratorBlock(4, 4))
    wrap(module, "fsdp", World(world_size=2, device=torch.device("cuda", 0)), "auto", cpu_offload=True)
    assert len(calls) == 3  # each block, then the root
    for kw in calls:
        assert kw["mp_policy"].param_dtype is torch.bfloat16 and kw["mp_policy"].reduce_dtype is torch.float32
        assert isinstance(kw["offload_policy"], fsdp.CPUOffloadPolicy)
    calls.clear()
    wrap(module, "fsdp", World(world_size=2), "auto")
    assert calls == [{}, {}, {}]  # a CPU keeps float32 and nothing is offloaded
    calls.clear()
    wrap(module, "fsdp", World(world_size=2), "bf16")
    assert all(kw["mp_policy"].param_dtype is torch.bfloat16 for kw in calls)
    calls.clear()
    vae = list(module[1].parameters())  # what runs outside the wrapped forward stays whole on every rank
    wrap(module, "fsdp", World(world_size=2), "none", unsharded=vae)
    assert calls[-1] == {"ignored_params": set(vae)} and calls[:-1] == [{}, {}]


def test_cpu_offload_outside_fsdp2_is_refused_by_name(start_model, small_dataset, tmp_path):
    from reasonedit.training import train_stage

    with pytest.raises(ValueError, match="train.cpu_offload: FSDP2's offload"):
        train_stage(stage_cfg(tmp_path, 2, steps=1, extra=["train.cpu_offload=true"]), 2, start_model, small_dataset,
                    tmp_path / "stage2")
