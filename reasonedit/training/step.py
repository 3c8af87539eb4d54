"""One optimiser step: every micro-batch's forward and backward, then the update, behind one interface.

`Stepper` runs plain PyTorch (one process, DDP, FSDP2): `loss.backward()` per micro-batch, clipping, AdamW, the
schedule. `DeepSpeedStepper` hands backward, clipping, the update and the schedule to the DeepSpeed engine. Both
run the EMA after an applied update, and both leave the step's figures on the device: the one host read a step
makes is whether the update was applied (and whether a rank got SIGTERM). On a process group a step makes two
all-reduces: its token counts (every term's and the real tokens, one tensor, before the first forward: they
normalise every micro-batch's loss) and its loss sums with the SIGTERM flag (after the backward: the skip rule
needs the loss over every rank before the update). `StepRecords` keeps the figures of the steps since the last
log line and reads them all at once.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from reasonedit.data.packing import PackedBatch
from reasonedit.losses import FlowMatchingConfig, LossSum
from reasonedit.stages import LossTotals, Stage, StageContext

from .distributed import World, all_reduce_sum
from .ema import GeneratorEMA
from .plan import deepspeed_held_bytes, held_bytes

Forward = Callable[[PackedBatch, StageContext], Mapping[str, LossSum]]  # batch, ctx -> each term's loss sum


def step_generator(seed: int, stage: int, step: int, micro: int) -> torch.Generator:
    """Noise and timesteps for global micro-batch `micro` of `step`: a pure function of the four, so a
    resumed run and a run on another number of ranks draw the same."""
    digest = hashlib.sha256(f"{seed}/{stage}/{step}/{micro}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


@dataclass
class StepOutcome:
    """What one step did. The figures are 0-dim tensors on the device, over every rank: read them through
    `StepRecords` at the logging cadence (or `host_losses` when a step went wrong)."""

    applied: bool  # the loss and gradient were finite and the update was made (else: gradients dropped)
    stop: bool  # some rank asked to stop (SIGTERM) before this step's update
    losses: dict[str, torch.Tensor]  # each term's loss per token (float64)
    total: torch.Tensor  # the stage's `combine` of them, in float32 (the history's "loss")
    grad_norm: torch.Tensor  # before clipping
    tokens: torch.Tensor  # real tokens of the step's micro-batches
    lr: float  # the learning rate of this step's update

    def figures(self) -> torch.Tensor:
        """(terms + 3,) float64: the losses, total, gradient norm and tokens, for one host read."""
        values = [*self.losses.values(), self.total, self.grad_norm, self.tokens]
        device = self.total.device
        return torch.stack([v.detach().to(device, torch.float64) for v in values])

    def host_losses(self) -> dict[str, float]:
        return dict(zip(self.losses, self.figures()[:len(self.losses)].tolist()))


class Stepper:
    """One optimiser step of plain PyTorch, created once per run; `step(micro, at)` trains on the micro-batches
    `micro` (this rank's share of step `at`) and returns a `StepOutcome`."""

    def __init__(self, forward: Forward, stage: Stage, world: World, optimizer: torch.optim.Optimizer,
                 scheduler=None, params: Sequence[torch.nn.Parameter] = (), grad_clip: float = 0.0,
                 ema: GeneratorEMA | None = None, flow_matching: FlowMatchingConfig | None = None, seed: int = 0,
                 condition_cache=None, stop_requested: Callable[[], bool] = lambda: False, host_counts: bool = False):
        self.forward, self.stage, self.world = forward, stage, world
        # True: the step's all-reduced counts are read back to the host before the forward, as steps did before
        # they stayed on the device (one more host read a step on a process group; bench/train_step.py's baseline)
        self.host_counts = host_counts
        self.optimizer, self.scheduler, self.params, self.grad_clip = optimizer, scheduler, list(params), grad_clip
        self.ema, self.seed, self.cache = ema, seed, condition_cache
        self.flow_matching = flow_matching or FlowMatchingConfig()
        self.stop_requested = stop_requested
        self.held: dict[str, int] | None = None  # bytes this rank holds, measured at the first update (plan.py)

    def step(self, micro: Sequence[PackedBatch], at: int) -> StepOutcome:
        """Forward and backward each micro-batch (gradients accumulate), then update once: clipped, and only
        when the loss and the gradient norm are finite, else the gradients are dropped. A stage with
        `updates_per_batch` K > 1 (rl) gets K such updates over the same micro-batches; the outcome holds their
        mean losses and gradient norm and the first one's lr. A first update that is not finite leaves the model
        as it was (the trainer tries the step again on the next batches); a later one ends the step's updates."""
        # every micro-batch of the step first: its token counts normalise every term (on the device after the
        # all-reduce: the losses are scaled there, nothing waits for them)
        counts, tokens = self.global_counts(micro)
        outcomes = []
        for update in range(self.stage.updates_per_batch):
            outcome = self._update(micro, at, update, counts, tokens)
            outcomes.append(outcome)
            if not outcome.applied:
                break
        if len(outcomes) == 1 or not outcomes[0].applied:
            return outcomes[0]
        done = [o for o in outcomes if o.applied]
        mean = lambda values: torch.stack(values).mean()  # noqa: E731
        return StepOutcome(True, any(o.stop for o in outcomes),
                           {t: mean([o.losses[t] for o in done]) for t in done[0].losses},
                           mean([o.total for o in done]), mean([o.grad_norm.float() for o in done]), tokens,
                           outcomes[0].lr)

    def _update(self, micro: Sequence[PackedBatch], at: int, update: int, counts: Mapping, tokens: torch.Tensor
                ) -> StepOutcome:
        """One update over the micro-batches: each one's forward and backward, then the clipped, finite update."""
        stage, world = self.stage, self.world
        totals = LossTotals.zeros(stage.terms)
        for i, batch in enumerate(micro):
            ctx = self.context(at, i, update)
            with self.accumulating(last=i == len(micro) - 1):
                with self.autocast():
                    sums = self.forward(batch, ctx)
                self.backward(stage.normalised_loss(sums, counts, world.world_size))
            totals.add(sums)
        # the step's loss sums and stop flag over all ranks in one reduction, left on the device (the flag is
        # filled in there, not copied: a host-to-device copy waits for the queue too)
        device = totals.sums[stage.terms[0]].device
        stopping = torch.full((), float(self.stop_requested()), dtype=torch.float64, device=device)
        reduced = all_reduce_sum(torch.stack([*(totals.sums[t].to(device) for t in stage.terms), stopping]))
        n = len(stage.terms)
        losses = LossTotals(dict(zip(stage.terms, reduced[:n])), counts).means(empty=0.0)
        total = stage.combine({t: v.float() for t, v in losses.items()})
        lr = self.lr()
        grad_norm, finite = self.update(total)
        # the update's one host read: the skip rule and SIGTERM change what the loop does next
        applied, stop = torch.stack([finite.to(reduced.device), reduced[n] > 0]).tolist()
        if applied:
            self.apply()
            if self.ema is not None:
                self.ema.update()
        else:
            self.drop()
        return StepOutcome(applied, stop, losses, total, grad_norm, tokens, lr)

    def global_counts(self, micro: Sequence[PackedBatch]) -> tuple[dict[str, float | torch.Tensor], torch.Tensor]:
        """Each term's tokens in the whole step and its real tokens: this rank's micro-batches, summed over the
        ranks (known before any forward, so the first micro-batch's loss is already normalised by the step's
        total). One process: the terms' counts are host numbers (free to read). A process group: one all-reduce
        of all of them, left where it ran (0-dim tensors on the device), unless `host_counts`."""
        terms, device = self.stage.terms, self.world.device
        local = [float(sum(self.stage.counts(mb)[t] for mb in micro)) for t in terms]
        tokens = float(sum(sum(mb.tokens) for mb in micro))
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return dict(zip(terms, local)), torch.full((), tokens, dtype=torch.float64, device=device)
        # filled in on the device, not copied there (a host-to-device copy waits for the queue)
        reduced = all_reduce_sum(torch.stack([torch.full((), v, dtype=torch.float64, device=device)
                                              for v in (*local, tokens)]))
        if self.host_counts:
            return dict(zip(terms, reduced[:len(terms)].tolist())), reduced[len(terms)]
        return dict(zip(terms, reduced[:len(terms)])), reduced[len(terms)]

    def context(self, at: int, i: int, update: int = 0) -> StageContext:
        world = self.world
        return StageContext(self.flow_matching, step_generator(self.seed, self.stage.number, at,
                                                               i * world.world_size + world.rank),
                            world.device, self.cache, same_modules=world.world_size > 1, micro=i, update=update)

    def autocast(self):
        return (torch.autocast("cuda", dtype=torch.bfloat16) if self.world.device.type == "cuda"
                else contextlib.nullcontext())

    def accumulating(self, last: bool):
        """DDP reduces gradients on the last micro-batch's backward only."""
        return contextlib.nullcontext() if last or not hasattr(self.forward, "no_sync") else self.forward.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0] if self.scheduler is not None else self.optimizer.param_groups[0]["lr"]

    def update(self, total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pre-clip gradient norm and whether the step is finite, both on the device; clips in place."""
        if self.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
                grad_norm = grad_norm.full_tensor()
        else:
            grad_norm = torch.zeros((), device=total.device)
        return grad_norm, torch.isfinite(total) & torch.isfinite(grad_norm).to(total.device)

    def apply(self) -> None:
        self.optimizer.step()
        if self.held is None and isinstance(self.forward, torch.nn.Module):  # gradients and moments all exist now
            self.held = held_bytes(self.forward, self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()

    def drop(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


class DeepSpeedStepper(Stepper):
    """The DeepSpeed engine owns the optimizer, the schedule, clipping and the update, and its own precision
    (the JSON's bf16 section), so no autocast; it skips a non-finite update by itself."""

    def __init__(self, engine, stage: Stage, world: World, **kw):
        super().__init__(engine, stage, world, engine.optimizer, engine.lr_scheduler, **kw)
        self.engine = engine
        # the gradient partitions exist only inside the update: counted as the inner optimizer steps on them
        self._gradient_bytes = 0
        inner = getattr(engine.optimizer, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):
            inner.register_step_pre_hook(self._count_gradients)

    def _count_gradients(self, optimizer, args, kwargs) -> None:
        if self.held is None:
            self._gradient_bytes += sum(p.grad.numel() * p.grad.element_size() for g in optimizer.param_groups
                                        for p in g["params"] if p.grad is not None)

    def autocast(self):
        return contextlib.nullcontext()

    def accumulating(self, last: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # already normalised by the global count

    def update(self, total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # clips, steps AdamW and the schedule; skips by itself (and clears the gradients) when the gradient
        # norm is not finite
        self.engine.step()
        if self.held is None:  # the partitions and the moments all exist now (plan.py)
            self.held = deepspeed_held_bytes(self.engine, self._gradient_bytes)
        grad_norm = self.engine.get_global_grad_norm()
        if not isinstance(grad_norm, torch.Tensor):  # a float, or None before any step
            grad_norm = torch.full((), 0.0 if grad_norm is None else grad_norm, device=total.device)
        return grad_norm, torch.isfinite(total) & self.engine.was_step_applied()

    def apply(self) -> None:
        pass

    def drop(self) -> None:
        pass


@dataclass
class StepRecord:
    step: int
    history: dict[str, float]  # losses per term, loss, lr, grad_norm: the run's history entry
    metrics: dict[str, float]  # what the metrics sink logs
    tokens: float


class StepRecords:
    """The applied steps since the last read, their figures still on the device; `read` brings them all to the
    host at once (one sync per log line instead of several per step)."""

    def __init__(self, terms: Sequence[str]):
        self.terms = tuple(terms)
        self.pending: list[tuple[int, StepOutcome, float, float, int]] = []

    def add(self, step: int, outcome: StepOutcome, seconds: float, packing: float, skipped: int) -> None:
        self.pending.append((step, outcome, seconds, packing, skipped))

    def read(self) -> list[StepRecord]:
        if not self.pending:
            return []
        rows = torch.stack([o.figures() for _, o, *_ in self.pending]).tolist()
        out = []
        for (step, o, seconds, packing, skipped), row in zip(self.pending, rows):
            losses = dict(zip(self.terms, row))
            total, grad_norm, tokens = row[len(self.terms):]
            history = {**losses, "loss": total, "lr": o.lr, "grad_norm": grad_norm}  # pre-clip norm
            metrics = {**{f"loss/{t}": v for t, v in losses.items()}, "loss/total": total, "lr": o.lr,
                       "grad_norm": grad_norm, "tokens_per_s": tokens / seconds, "packing": packing,
                       "skipped": skipped}
            out.append(StepRecord(step, history, metrics, tokens))
        self.pending = []
        return out


__all__ = ["DeepSpeedStepper", "StepOutcome", "StepRecord", "StepRecords", "Stepper", "step_generator"]
