"""A training step's host syncs and collectives, counted (reasonedit.testing.syncs): one host read a step (the skip
rule and SIGTERM), one more at each log line; on a process group two all-reduces a step (its counts before the
forward, its loss sums and SIGTERM flag after the backward) and still one host read (the counts stay on the
device)."""

import pytest

from tests.test_stages import stage_cfg, start_model  # noqa: F401  (the module-scoped fixture)

READS_PER_STEP = 1  # whether the update was applied and whether a rank got SIGTERM: the loop branches on it
COLLECTIVES_PER_STEP = 2  # on a process group: the counts (one tensor), the loss sums with the SIGTERM flag


def syncs_per_step(start_model, small_dataset, out, monkeypatch, steps, extra=()):
    """Train stage 2 for `steps` steps of one micro-batch; per step (split at each `BatchStream.next`), the host
    reads the training runtime and the losses make, and the collectives."""
    from reasonedit.testing.syncs import HostSyncs
    from reasonedit.training import data as data_mod
    from reasonedit.training import train_stage

    cfg = stage_cfg(out, 2, steps=steps, extra=["stage2.grad_accum=1", "train.checkpoint_every=0", *extra])
    real_next = data_mod.BatchStream.next
    with HostSyncs() as syncs:
        def next_batch(stream):
            syncs.mark("step")
            return real_next(stream)
        monkeypatch.setattr(data_mod.BatchStream, "next", next_batch)
        train_stage(cfg, 2, start_model, small_dataset, out / "stage2")
    per_step = syncs.between_marks()
    assert len(per_step) == steps
    return {i + 1: ([t for k, t in span if k == "read"], [t for k, t in span if k == "collective"])
            for i, span in enumerate(per_step)}


def test_a_step_reads_the_host_once_and_a_logged_step_once_more(start_model, small_dataset, tmp_path, monkeypatch):
    shown = syncs_per_step(start_model, small_dataset, tmp_path, monkeypatch, 6, ["train.log_every=3"])
    for i in (1, 2, 4, 5):  # no log line: the skip rule's read only
        reads, collectives = shown[i]
        assert len(reads) == READS_PER_STEP and reads[0].startswith("tolist @ reasonedit/training/step.py"), shown
        assert collectives == [], shown
    # step 3 logs: one more, every pending step's figures at once (step 6 also saves the model: not compared)
    assert len(shown[3][0]) == READS_PER_STEP + 1, shown


def test_a_step_on_a_process_group_makes_two_all_reduces_and_still_one_host_read(start_model, small_dataset,
                                                                                  tmp_path, monkeypatch):
    """A gloo group of one process: the counts are all-reduced once, with the tokens, and never read back."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        shown = syncs_per_step(start_model, small_dataset, tmp_path, monkeypatch, 3, ["train.log_every=3"])
    finally:
        dist.destroy_process_group()
    for i in (1, 2):
        reads, collectives = shown[i]
        assert collectives == ["all_reduce"] * COLLECTIVES_PER_STEP, shown
        assert len(reads) == READS_PER_STEP, shown


def test_the_counter_counts_reads_under_its_roots_and_collectives_and_unpatches(tmp_path):
    import torch

    from reasonedit.testing.syncs import HostSyncs

    here = tmp_path / "counted.py"
    here.write_text("def read(t):\n    return t.sum().item(), bool(t.any()), t.tolist()\n")
    namespace: dict = {}
    exec(compile(here.read_text(), str(here), "exec"), namespace)
    before = dict(vars(torch.Tensor))
    with HostSyncs(roots=[tmp_path]) as syncs:
        namespace["read"](torch.ones(2))
        torch.ones(2).sum().item()  # this file is not under the roots: a host tensor read here is no sync
    assert [r.split(" @ ")[0] for r in syncs.reads] == ["item", "__bool__", "tolist"]
    assert dict(vars(torch.Tensor)) == before  # nothing left patched


@pytest.mark.parametrize("host_counts", [False, True])
def test_normalised_losses_are_the_same_with_counts_on_the_host_or_the_device(host_counts):
    import torch

    from reasonedit.losses import normalise

    x = torch.randn(64).sum()
    for count in (3.0, 17.0, 12345.0, 0.0):
        c = count if host_counts else torch.tensor(count, dtype=torch.float64)
        assert torch.equal(normalise(x, c, 2), normalise(x, count, 2))
