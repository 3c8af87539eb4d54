"""One stage's training run, top to bottom: set up, build model and EMA, build data, loop, log, save.

The same code path runs one CPU process, torchrun (DDP or FSDP2, gloo on CPU), DeepSpeed ZeRO-2/3 and
bf16 on GPUs. Everything clever lives in a named component: `losses` (sums and counts, `normalise`),
`stages` (what trains, data, loss terms), `training.step` (one optimiser step, plain or DeepSpeed),
`training.data` (the resumable batch stream), `training.checkpoint`, `training.ema`,
`training.distributed`, `training.zero` (DeepSpeed), `training.schedule`, `training.metrics`, `training.output`
(the output folder checked, and every path the stage writes proved inside it, before the model loads; a failed
write is one clear `OutputError`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from reasonedit.config import ExperimentConfig, TrainConfig
from reasonedit.data.loader import LoaderStats
from reasonedit.models.preprocess import PreprocessConfig, Preprocessor, buckets_for
from reasonedit.data.segments import ConditionDropout, GeneratorSegment
from reasonedit.models.model import COMPONENTS, CONFIG_FILE, ReasonEditModel
from reasonedit.paths import inside
from reasonedit.publish import atomic_write_text
from reasonedit.stages import Stage, StageContext, stage_for

from . import checkpoint as ckpt
from .compiled import compile_blocks, compile_enabled, fused_adamw
from .data import BatchStream, Sources, SplitBatchStream, stage_loader
from .distributed import World, all_reduce_sum, barrier, init_world, resolve_parallel, wrap
from .ema import GeneratorEMA
from .metrics import MetricsSink, ProgressWindow, plot_figures
from .output import LATENT_CACHE, prepare_output, writing
from .resume import check_resume, run_config
from .schedule import stage_scheduler
from .step import DeepSpeedStepper, StepRecords, Stepper

if TYPE_CHECKING:
    from reasonedit.data.condition_cache import ConditionCache

log = logging.getLogger("reasonedit.train")


class TrainingStopped(RuntimeError):
    """The run stopped on purpose: too many non-finite losses in a row."""


@dataclass
class StageResult:
    stage: str
    output: Path  # the stage's folder: model/, checkpoints/
    model: Path | None  # the saved model folder (None when stopped by SIGTERM before the end)
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)  # per optimiser step: losses, lr, grad_norm
    skipped: int = 0
    interrupted: bool = False
    seconds: float = 0.0
    evals: list[dict] = field(default_factory=list)  # held-out figures: {"step": N, figure: value, ...}
    data: LoaderStats | None = None  # this rank's records read and skipped, by dataset and reason (resumes included)


class StageModule(torch.nn.Module):
    """The model and its stage as one module, so DDP / FSDP2 wrap one forward: batch -> loss sums."""

    def __init__(self, model: ReasonEditModel, stage: Stage):
        super().__init__()
        self.model, self.stage = model, stage

    def forward(self, batch, ctx: StageContext) -> dict:
        return self.stage.loss_sums(self.model, batch, ctx)


def _start_identity(path: Path) -> str:
    meta = path / CONFIG_FILE
    return f"{path.resolve()}:{meta.stat().st_mtime_ns}" if meta.is_file() else str(path.resolve())


def load_stage_model(stage: Stage, start: Path) -> ReasonEditModel:
    """The model a stage starts from, with exactly the declared parameters trainable."""
    model = ReasonEditModel.from_pretrained(start, components=stage.components, lora_trainable=True)
    stage.prepare(model)
    return model


@dataclass
class RunState:
    """Where a run stands, as a checkpoint's trainer.pt keeps it."""

    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # per applied step: losses, lr, grad_norm
    skipped: int = 0
    bad_in_row: int = 0
    evals: list[dict] = field(default_factory=list)  # {"step": N, **figures} of each held-out evaluation


def optimisation(stage: Stage, model: ReasonEditModel, tc: TrainConfig, world: World,
                 parallel: str) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any, list[torch.nn.Parameter]]:
    """The stage module wrapped for `parallel`, its optimizer, its schedule and its trainable parameters. Under
    DeepSpeed the engine is the module: it owns the optimizer, the schedule, clipping and the update."""
    sc = stage.config
    if parallel == "deepspeed":
        from . import zero
        engine = zero.initialize(StageModule(model, stage), tc, sc, stage.name, world)
        return engine, engine.optimizer, engine.lr_scheduler, []
    if tc.cpu_offload and parallel != "fsdp":
        raise ValueError(f"train.cpu_offload: FSDP2's offload (train.parallel=fsdp); under {parallel} there is none "
                         "(DeepSpeed: set zero_optimization.offload_optimizer in its JSON)")
    # the VAE encodes latents in preprocessing, outside the wrapped forward: FSDP2 must leave it whole
    vae = list(model.vae.parameters()) if model.vae is not None else []
    module = wrap(StageModule(model, stage), parallel, world, tc.fsdp_mixed_precision, tc.cpu_offload, vae)
    params = [p for p in module.parameters() if p.requires_grad]
    fused = fused_adamw(compile_enabled(tc.compile, world.device, parallel), params)
    optimizer = torch.optim.AdamW(params, lr=sc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay,
                                  **({"fused": True} if fused else {}))
    return module, optimizer, stage_scheduler(optimizer, sc), params


def stage_data(cfg: ExperimentConfig, stage: Stage, model: ReasonEditModel, data: Sources, out: Path,
               world: World) -> tuple[Preprocessor, BatchStream | SplitBatchStream, ConditionCache | None]:
    """This rank's resumable batch stream of the stage's mix, its preprocessor (with the latent cache when
    configured) and the condition cache when the stage uses one (else None)."""
    b, sc = cfg.batches, stage.config
    pre = Preprocessor.from_model(model, PreprocessConfig(
        buckets=buckets_for(model, b.pixel_budget), dropout=ConditionDropout(b.text_dropout, b.image_dropout),
        seed=cfg.seed))
    # tokenising and resizing run in the loader workers (train.num_workers), the VAE here on its device
    prepare = functools.partial(stage.segments, Preprocessor(
        pre.processor, None, dataclasses.replace(pre.config, encode_latents=False), pre.template, pre.policy))

    def finish(sample) -> list:
        segments = sample.result()
        todo = [s for s in segments if isinstance(s, GeneratorSegment) and not s.has_latents]
        if todo:
            pre.encode_latents(todo)  # through the latent cache
        return segments

    def stream_of(part: int = 0, parts: int = 1, rank: int = 0, world_size: int = 1) -> BatchStream:
        return BatchStream(stage_loader(data, stage.mix, cfg.seed, b.shuffle_buffer, cfg.train.num_workers, part, parts,
                                        transform=prepare), stage.packer(b.window), finish, rank, world_size)

    streams = cfg.train.data_streams
    stream = (SplitBatchStream(stream_of, streams, world.rank, world.world_size) if streams
              else stream_of(rank=world.rank, world_size=world.world_size))
    if sc.latent_cache and model.vae is not None:
        from reasonedit.models.latent_cache import LatentCache
        # one folder per experiment: stage 3 reads what stage 2 encoded (entries are keyed by the VAE's weights)
        pre.latent_cache = LatentCache(inside(cfg.output_dir, Path(cfg.output_dir) / LATENT_CACHE), model.vae)
    cache = None
    if stage.uses_condition_cache and sc.condition_cache:
        from reasonedit.data.condition_cache import ConditionCache
        cache = ConditionCache(inside(out, out / "condition_cache"), model.reasoner,
                               backend=model.config.attention_backend)
    return pre, stream, cache


def resume(root: Path, identity: str, run_cfg: dict, stage: Stage, tc: TrainConfig, world: World,
           module: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, stream: BatchStream | SplitBatchStream,
           ema: GeneratorEMA | None) -> RunState:
    """The run's state from its latest checkpoint under `root`, restoring the weights, optimizer, schedule, batch
    stream and EMA in place; a fresh state when there is none, or when it was trained from another start model
    (its checkpoints are then moved aside)."""
    found = ckpt.latest(root)
    if found is None:
        return RunState()
    saved = ckpt.read_state(found / "trainer.pt")
    if saved.get("start") != identity:
        stale = root.parent / f"checkpoints.stale-{time.strftime('%Y%m%d-%H%M%S')}"
        barrier()
        if world.is_main:
            root.rename(stale)  # kept, not deleted, and never mixed with this run's checkpoints
        barrier()
        log.info("%s: %s was trained from another starting model; moved to %s, starting afresh",
                 stage.name, found, stale)
        return RunState()
    check_resume(saved.get("config"), run_cfg, f"{stage.name}: checkpoint {found}", tc.allow_config_change)
    trainer_state, rank_state = ckpt.load_checkpoint(found, world, module, optimizer)
    scheduler.load_state_dict(trainer_state["scheduler"])
    state = RunState(trainer_state["step"], trainer_state["history"], trainer_state["skipped"],
                     trainer_state["bad_in_row"], trainer_state.get("evals", []))
    stream.load_state_dict(rank_state["stream"])
    if ema is not None:
        ema.load_state_dict(rank_state["ema"])
    log.info("%s: resumed from %s at step %d", stage.name, found, state.step)
    return state


def stage_figures(stage: Stage) -> torch.Tensor | None:
    """The stage's figures of this step (`Stage.take_figures`), each's mean over every micro-batch of every rank, as
    one (figures,) float64 tensor left where it is (read with the step's losses at the next log line); None for a
    stage that measures none."""
    taken = stage.take_figures()
    if not stage.figures:
        return None
    sums = torch.stack([taken[f].sum.double() for f in stage.figures] + [taken[f].count.double()
                                                                         for f in stage.figures])
    sums = all_reduce_sum(sums)
    n = len(stage.figures)
    return sums[:n] / sums[n:].clamp_min(1.0)


def train_stage(cfg: ExperimentConfig, stage_number: int | str, start: Path, data: Sources, out: Path,
                world: World | None = None, evaluate: Callable[[ReasonEditModel], dict] | None = None,
                reward: Callable | None = None) -> StageResult:
    """Train one stage from the model folder `start` on `data` (a dataset directory, or (directory, weight)
    pairs) into `out` (checkpoints, model/).

    evaluate: called with the live model every `train.eval_every` steps and at the end, on the main rank; its
        figures (held-out metrics) are logged, kept in the checkpoint and written to out/evals.json.
    reward: what scores a stage's rollouts (the rl stage: `stages.rl.RewardFn`), built by the caller, which may
        import what this layer may not (an editor, the oracle, a judge client).
    """
    world = world or init_world()
    stage = stage_for(stage_number, cfg)
    if stage.needs_reward and reward is None:
        raise ValueError(f"{stage.name}: needs a reward for its rollouts; build one with "
                         "reasonedit.experiment.rl_reward(cfg) and pass train_stage(..., reward=...)")
    stage.reward = reward
    sc, tc = stage.config, cfg.train
    root = out / "checkpoints"
    # before the model loads: a folder we cannot write, or a symlink out of it, fails now
    prepare_output(out, root, world, stage.name, Path(cfg.output_dir) if sc.latent_cache else None)
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)

    # -- model, optimiser, schedule, EMA ---------------------------------------------------------
    model = load_stage_model(stage, start).to(world.device)
    model.train()
    if tc.activation_checkpointing:
        if model.generator is not None:
            model.generator.enable_gradient_checkpointing()
        model.reasoner.model.gradient_checkpointing_enable()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    trainable_numel = sum(p.numel() for p in model.parameters() if p.requires_grad)  # before any sharding
    parallel = resolve_parallel(tc.parallel, world)
    if compile_enabled(tc.compile, world.device, parallel):  # in place, before wrapping: the names stay the same
        compile_blocks(model)
    module, optimizer, scheduler, params = optimisation(stage, model, tc, world, parallel)
    ema = None
    if tc.ema_decay > 0 and model.generator is not None:  # after wrapping: it keeps the local shards
        ema = GeneratorEMA({n: p for n, p in model.generator.named_parameters() if p.requires_grad}, tc.ema_decay,
                           getattr(torch, tc.ema_dtype))

    # -- data ------------------------------------------------------------------------------------
    pre, stream, cache = stage_data(cfg, stage, model, data, out, world)

    # -- resume ----------------------------------------------------------------------------------
    identity, run_cfg = _start_identity(start), run_config(cfg, stage.name)
    state = resume(root, identity, run_cfg, stage, tc, world, module, optimizer, scheduler, stream, ema)

    def save(at: int) -> Path:
        read_records()
        trainer_state = {"step": at, "scheduler": scheduler.state_dict(), "history": state.history,
                         "skipped": state.skipped, "bad_in_row": state.bad_in_row, "start": identity,
                         "stage": stage.name, "config": run_cfg, "evals": state.evals}
        rank_state = {"stream": stream.state_dict(), "ema": ema.state_dict() if ema is not None else None}
        # names as the StageModule sees them ("model." + the ReasonEditModel's name)
        with writing(f"{stage.name}: checkpoint of step {at}"):
            return ckpt.save_checkpoint(inside(out, root), at, world, module, optimizer,
                                        {f"model.{n}" for n in trainable}, trainer_state, rank_state, tc.keep_last)

    # -- SIGTERM: finish the step, save, exit cleanly ---------------------------------------------
    stop = {"sigterm": False}
    previous_handler = None
    with contextlib.suppress(ValueError):  # not the main thread: no handler
        previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("sigterm", True))

    # -- logging: the steps' figures stay on the device until a log line, a checkpoint or an evaluation --
    sink = MetricsSink(out, f"{cfg.name}-{stage.name}", {"stage": asdict(sc), "train": asdict(tc)},
                       tc.wandb, tc.tensorboard, world.is_main)
    progress = ProgressWindow(stage.name, sc.steps, stage.terms, stage.figures)
    records = StepRecords(stage.terms)
    pending_figures: dict[int, torch.Tensor] = {}  # the stage's figures of the steps not yet read, by step

    def read_records() -> None:
        read = records.read()
        figures = dict(zip(pending_figures, torch.stack(list(pending_figures.values())).tolist())) \
            if pending_figures else {}
        pending_figures.clear()
        for r in read:
            extra = dict(zip(stage.figures, figures.get(r.step, ())))
            r.history.update(extra)
            r.metrics.update({f"{stage.name}/{k}": v for k, v in extra.items()})
            state.history.append(r.history)
            progress.add(r.history, r.tokens)
            if world.is_main:
                sink.log(r.step, r.metrics)

    def held_out(at: int) -> None:
        read_records()
        if evaluate is None or not world.is_main or any(e["step"] == at for e in state.evals):
            return
        model.eval()
        try:
            with torch.no_grad():
                figures = evaluate(model)
        finally:
            model.train()
        state.evals.append({"step": at, **figures})
        sink.log(at, {f"eval/{k}": v for k, v in figures.items()})
        log.info("%s step %d | held-out %s", stage.name, at,
                 " ".join(f"{k} {v:.3g}" for k, v in figures.items() if isinstance(v, (int, float))))

    # -- the loop --------------------------------------------------------------------------------
    step_kw = dict(ema=ema, flow_matching=cfg.flow_matching, seed=cfg.seed, condition_cache=cache,
                   stop_requested=lambda: stop["sigterm"])
    stepper = (DeepSpeedStepper(module, stage, world, **step_kw) if parallel == "deepspeed" else
               Stepper(module, stage, world, optimizer, scheduler, params, tc.grad_clip, **step_kw))
    log.info("%s: trains %s; %d trainable parameters; %s on %d rank(s); lr %.1e, %d steps",
             stage.name, stage.trains, trainable_numel, parallel, world.world_size, sc.lr, sc.steps)
    interrupted = held_logged = False
    if tc.eval_every and state.step == 0:
        held_out(0)
    try:
        while state.step < sc.steps:
            t0 = time.perf_counter()
            outcome = stepper.step([stream.next() for _ in range(sc.grad_accum)], state.step)
            figures = stage_figures(stage)  # taken every step, so a skipped step's are dropped with it
            if not outcome.applied:
                state.skipped += 1
                state.bad_in_row += 1
                log.warning("%s step %d: non-finite loss %s; step skipped (%d in a row, %d in all)",
                            stage.name, state.step, outcome.host_losses(), state.bad_in_row, state.skipped)
                if state.bad_in_row >= tc.max_bad_steps:
                    read_records()
                    raise TrainingStopped(f"{stage.name}: {state.bad_in_row} non-finite losses in a row at step "
                                          f"{state.step} (train.max_bad_steps={tc.max_bad_steps}); lower the lr "
                                          f"({stage.name}.lr={sc.lr}) or check the data")
                continue  # the same step number is tried again on the next batches
            state.bad_in_row = 0
            state.step += 1
            step = state.step
            packing = stream.utilisation
            records.add(step, outcome, time.perf_counter() - t0, packing, state.skipped)
            if figures is not None:
                pending_figures[step] = figures
            if stepper.held is not None and not held_logged:  # what `reasonedit plan` predicts, measured
                held_logged = True
                log.info("%s: rank %d holds parameters %d B, gradients %d B, optimizer %d B", stage.name, world.rank,
                         stepper.held["parameters"], stepper.held["gradients"], stepper.held["optimizer"])
            if step % tc.log_every == 0 or step == sc.steps:
                read_records()
                if world.is_main:
                    log.info(progress.line(step, outcome.lr, packing, state.skipped))
            if outcome.stop:
                save(step)
                log.warning("%s: SIGTERM: saved step %d and stopped; run again to resume", stage.name, step)
                interrupted = True
                break
            if tc.eval_every and step % tc.eval_every == 0 and step < sc.steps:
                held_out(step)
            if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step < sc.steps:
                save(step)
        read_records()
        if not interrupted:
            held_out(state.step)
    finally:
        sink.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)

    log.info("%s: rank %d read and preprocessed %d records%s%s", stage.name, world.rank, stream.records,
             f" (its {len(stream.streams)} of {stream.count} data streams)" if isinstance(stream, SplitBatchStream)
             else "", f" in {tc.num_workers} loader workers" if tc.num_workers else "")
    data_stats = stream.loader_stats
    log.log(logging.WARNING if data_stats.total_skipped or data_stats.total_uncounted else logging.INFO,
            "%s: rank %d skipped %d records: %s", stage.name, world.rank, data_stats.total_skipped,
            data_stats.summary())
    for what, c in (("latent cache", pre.latent_cache), ("condition cache", cache)):
        if c is not None:
            log.info("%s: %s: %d hits, %d misses, %d unreadable entries recomputed", stage.name, what,
                     c.stats.hits, c.stats.misses, c.stats.unreadable)
    step = state.step
    result = StageResult(stage.name, out, None, step, state.history, state.skipped, interrupted, evals=state.evals,
                         data=data_stats)
    if world.is_main:  # for the learning curves: per-step losses and the held-out figures
        with writing(f"{stage.name}: the loss history"):
            atomic_write_text(out / "history.json", json.dumps(state.history) + "\n")
            if state.evals:
                atomic_write_text(out / "evals.json", json.dumps(state.evals, indent=2) + "\n")
            if stage.figures:  # a stage that measures more than its losses (rl): its curves, one panel each
                plot_figures(state.history, (*stage.terms, *stage.figures), out / "curves.png",
                             f"{cfg.name} {stage.name}")
    if not interrupted:
        if ckpt.latest(root) is None or ckpt.latest(root).name != f"step_{step:08d}":
            save(step)
        with writing(f"{stage.name}: the trained model"):
            result.model = save_stage_model(module, model, stage, start, out, world, ema,
                                            {f"model.{n}" for n in trainable})
    result.seconds = time.perf_counter() - started
    return result


def save_stage_model(module: torch.nn.Module, model: ReasonEditModel, stage: Stage, start: Path, out: Path,
                     world: World, ema: GeneratorEMA | None, trainable: set[str]) -> Path:
    """Write out/model (a full ReasonEditModel folder) and, with an EMA, out/model_ema (EMA generator).
    Sharded weights (FSDP2, ZeRO-3) are gathered first: every rank takes part."""
    full = ckpt.full_trainable_state(module, trainable)
    path = inside(out, out / "model")
    if world.is_main:
        final = load_stage_model(stage, start)  # unsharded, on the CPU, same structure
        final.load_state_dict({k.removeprefix("model."): v for k, v in full.items()}, strict=False)
        if final.generator is None and not {"generator", "vae"} <= set(final.references):
            # stage 1: the generator and VAE are carried over from the start model (a reference to a diffusers
            # folder is carried as it is, without loading the weights)
            carried = ReasonEditModel.from_pretrained(start)
            refs = {**carried.references, **final.references}
            final = ReasonEditModel(final.reasoner, carried.generator, carried.vae, final.config)
            final.references = refs
        for component in COMPONENTS:
            if any(n.startswith(f"model.{component}.") for n in trainable):  # names as the StageModule has them
                final.changed(component)  # a trained part is saved in full
            elif component not in final.references and (start / component).is_dir():
                # a frozen part the start folder holds: referred to there, not copied again (a real reasoner is
                # ~15 GB); a reference to the start folder's reference is carried as it is
                final.references[component] = {"saved": str((start / component).resolve())}
        final.save_pretrained(path)
        if ema is not None and ema.sharded:
            log.warning("%s: the EMA is sharded over the ranks (FSDP2 / ZeRO-3); model_ema/ is not written, the "
                        "EMA shards are in the checkpoint's rank<r>.pt", stage.name)
        elif ema is not None:
            with torch.no_grad():
                for name, p in final.generator.named_parameters():
                    if name in ema.shadow:
                        p.copy_(ema.shadow[name].cpu())
            final.save_pretrained(inside(out, out / "model_ema"))
        atomic_write_text(inside(out, out / "stage.json"), json.dumps({
            "stage": stage.name, "start": str(start), "trains": stage.trains, "from_previous": stage.from_previous},
            indent=2) + "\n")
    barrier()
    return path


__all__ = ["RunState", "StageModule", "StageResult", "TrainingStopped", "load_stage_model", "optimisation", "resume",
           "stage_data", "stage_figures", "train_stage"]
