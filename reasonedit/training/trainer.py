"""One stage's training run, top to bottom: set up, build model and EMA, build data, loop, log, save.

The same code path runs one CPU process, torchrun (DDP or FSDP2, gloo on CPU), DeepSpeed ZeRO-2/3 and
bf16 on GPUs. Everything clever lives in a named component: `losses` (sums and counts, `normalise`),
`stages` (what trains, data, loss terms), `training.data` (the resumable batch stream),
`training.checkpoint`, `training.ema`, `training.distributed`, `training.zero` (DeepSpeed),
`training.schedule`, `training.metrics`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from reasonedit.config import ExperimentConfig
from reasonedit.data.preprocess import ConditionDropout, PreprocessConfig, Preprocessor, buckets_for
from reasonedit.losses import global_count, normalise
from reasonedit.models.model import CONFIG_FILE, ReasonEditModel
from reasonedit.publish import atomic_write_text
from reasonedit.stages import Stage, StageContext, stage_for

from . import checkpoint as ckpt
from .data import BatchStream, stage_loader
from .distributed import World, all_reduce_sum, any_rank, barrier, init_world, resolve_parallel, wrap
from .ema import GeneratorEMA
from .metrics import MetricsSink, ProgressWindow
from .resume import check_resume, run_config
from .schedule import make_scheduler

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


def step_generator(seed: int, stage: int, step: int, micro: int) -> torch.Generator:
    """Noise and timesteps for global micro-batch `micro` of `step`: a pure function of the four, so a
    resumed run and a run on another number of ranks draw the same."""
    digest = hashlib.sha256(f"{seed}/{stage}/{step}/{micro}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def train_stage(cfg: ExperimentConfig, stage_number: int, start: Path, data: Path, out: Path,
                world: World | None = None, evaluate: Callable[[ReasonEditModel], dict] | None = None) -> StageResult:
    """Train one stage from the model folder `start` on the dataset `data` into `out` (checkpoints, model/).

    evaluate: called with the live model every `train.eval_every` steps and at the end, on the main rank; its
        figures (held-out metrics) are logged, kept in the checkpoint and written to out/evals.json.
    """
    world = world or init_world()
    stage = stage_for(stage_number, cfg)
    sc, tc = stage.config, cfg.train
    out.mkdir(parents=True, exist_ok=True)
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
    engine = None  # the DeepSpeed engine: it owns the optimizer, the schedule, clipping and the update
    if parallel == "deepspeed":
        from . import zero
        module = engine = zero.initialize(StageModule(model, stage), tc, sc, stage.name, world)
        optimizer, scheduler = engine.optimizer, engine.lr_scheduler
        params = [p for p in engine.module.parameters() if p.requires_grad]
    else:
        module = wrap(StageModule(model, stage), parallel, world)
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=sc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
        scheduler = make_scheduler(optimizer, sc.warmup_steps, sc.steps, sc.min_lr_ratio)
    ema = None
    if tc.ema_decay > 0 and model.generator is not None:  # after wrapping: it keeps the local shards
        ema = GeneratorEMA({n: p for n, p in model.generator.named_parameters() if p.requires_grad}, tc.ema_decay)

    # -- data ------------------------------------------------------------------------------------
    b = cfg.batches
    pre = Preprocessor.from_model(model, PreprocessConfig(
        buckets=buckets_for(model, b.pixel_budget), dropout=ConditionDropout(b.text_dropout, b.image_dropout),
        seed=cfg.seed))
    stream = BatchStream(stage_loader(data, stage.mix, cfg.seed, b.shuffle_buffer, tc.num_workers),
                         stage.packer(b.window), lambda record: stage.segments(pre, record),
                         world.rank, world.world_size)
    if sc.latent_cache and model.vae is not None:
        from reasonedit.data.latent_cache import LatentCache
        # one folder per experiment: stage 3 reads what stage 2 encoded (entries are keyed by the VAE's weights)
        pre.latent_cache = LatentCache(Path(cfg.output_dir) / "latent_cache", model.vae)
    cache = None
    if stage_number == 2 and sc.condition_cache:
        from reasonedit.data.condition_cache import ConditionCache
        cache = ConditionCache(out / "condition_cache", model.reasoner, backend=model.config.attention_backend)

    # -- resume ----------------------------------------------------------------------------------
    root, identity = out / "checkpoints", _start_identity(start)
    step, history, skipped, bad_in_row = 0, [], 0, 0
    evals: list[dict] = []  # {"step": N, **figures} of each held-out evaluation
    found = ckpt.latest(root)
    run_cfg = run_config(cfg, stage.name)
    if found is not None:
        saved = torch.load(found / "trainer.pt", weights_only=False)
        if saved.get("start") == identity:
            check_resume(saved.get("config"), run_cfg, f"{stage.name}: checkpoint {found}", tc.allow_config_change)
            trainer_state, rank_state = ckpt.load_checkpoint(found, world, module, optimizer)
            scheduler.load_state_dict(trainer_state["scheduler"])
            step, history = trainer_state["step"], trainer_state["history"]
            skipped, bad_in_row = trainer_state["skipped"], trainer_state["bad_in_row"]
            evals = trainer_state.get("evals", [])
            stream.load_state_dict(rank_state["stream"])
            if ema is not None:
                ema.load_state_dict(rank_state["ema"])
            log.info("%s: resumed from %s at step %d", stage.name, found, step)
        else:
            stale = out / f"checkpoints.stale-{time.strftime('%Y%m%d-%H%M%S')}"
            barrier()
            if world.is_main:
                root.rename(stale)  # kept, not deleted, and never mixed with this run's checkpoints
            barrier()
            log.info("%s: %s was trained from another starting model; moved to %s, starting afresh",
                     stage.name, found, stale)

    def save(at: int) -> Path:
        trainer_state = {"step": at, "scheduler": scheduler.state_dict(), "history": history, "skipped": skipped,
                         "bad_in_row": bad_in_row, "start": identity, "stage": stage.name, "config": run_cfg,
                         "evals": evals}
        rank_state = {"stream": stream.state_dict(), "ema": ema.state_dict() if ema is not None else None}
        # names as the StageModule sees them ("model." + the ReasonEditModel's name)
        return ckpt.save_checkpoint(root, at, world, module, optimizer, {f"model.{n}" for n in trainable},
                                    trainer_state, rank_state,
                                    tc.keep_last)

    # -- SIGTERM: finish the step, save, exit cleanly ---------------------------------------------
    stop = {"sigterm": False}
    previous_handler = None
    with contextlib.suppress(ValueError):  # not the main thread: no handler
        previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("sigterm", True))

    sink = MetricsSink(out, f"{cfg.name}-{stage.name}", {"stage": asdict(sc), "train": asdict(tc)},
                       tc.wandb, tc.tensorboard, world.is_main)
    # DeepSpeed runs its own precision (the JSON's bf16 section: bf16 weights, float32 master weights)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if world.device.type == "cuda" and engine is None
                else contextlib.nullcontext())
    micro_per_rank = sc.grad_accum
    log.info("%s: trains %s; %d trainable parameters; %s on %d rank(s); lr %.1e, %d steps",
             stage.name, stage.trains, trainable_numel,
             parallel, world.world_size, sc.lr, sc.steps)
    interrupted = False
    progress = ProgressWindow(stage.name, sc.steps, stage.terms)

    def held_out(at: int) -> None:
        if evaluate is None or not world.is_main or any(e["step"] == at for e in evals):
            return
        model.eval()
        try:
            with torch.no_grad():
                figures = evaluate(model)
        finally:
            model.train()
        evals.append({"step": at, **figures})
        sink.log(at, {f"eval/{k}": v for k, v in figures.items()})
        log.info("%s step %d | held-out %s", stage.name, at,
                 " ".join(f"{k} {v:.3g}" for k, v in figures.items() if isinstance(v, (int, float))))

    if tc.eval_every and step == 0:
        held_out(0)
    try:
        while step < sc.steps:
            t0 = time.perf_counter()
            # every micro-batch of the step first: its token counts normalise every term
            micro = [stream.next() for _ in range(micro_per_rank)]
            counts = {t: global_count([stage.counts(mb)[t] for mb in micro]) for t in stage.terms}
            sums = {t: torch.zeros((), dtype=torch.float64) for t in stage.terms}
            for i, batch in enumerate(micro):
                ctx = StageContext(cfg.flow_matching, step_generator(cfg.seed, stage.number, step,
                                                                     i * world.world_size + world.rank),
                                   world.device, cache)
                sync = (contextlib.nullcontext() if i == len(micro) - 1 or engine is not None
                        or not hasattr(module, "no_sync") else module.no_sync())
                with sync:
                    with autocast:
                        terms = module(batch, ctx)
                    loss = stage.combine({t: normalise(terms[t].sum, counts[t], world.world_size)
                                          for t in stage.terms})
                    if engine is not None:
                        engine.backward(loss, scale_wrt_gas=False)  # already normalised by the global count
                    else:
                        loss.backward()
                for t in stage.terms:
                    sums[t] += terms[t].sum.detach().double().cpu()
            # the step's losses over all ranks, for the log and the finiteness check
            sums = {t: all_reduce_sum(v) for t, v in sums.items()}
            losses = {t: float(sums[t] / counts[t]) if float(counts[t]) > 0 else 0.0 for t in stage.terms}
            total = float(stage.combine({t: torch.tensor(v) for t, v in losses.items()}))
            lr = scheduler.get_last_lr()[0]
            if engine is not None:
                # clips, steps AdamW and the schedule; skips by itself (and clears the gradients) when the
                # gradient norm is not finite
                engine.step()
                grad_norm = float(engine.get_global_grad_norm() or 0.0)
                finite = math.isfinite(total) and engine.was_step_applied()
            else:
                grad_norm = (torch.nn.utils.clip_grad_norm_(params, tc.grad_clip) if tc.grad_clip > 0
                             else torch.zeros(()))
                finite = math.isfinite(total) and math.isfinite(float(grad_norm))
            if not finite:
                if engine is None:
                    optimizer.zero_grad(set_to_none=True)
                skipped += 1
                bad_in_row += 1
                log.warning("%s step %d: non-finite loss %s; step skipped (%d in a row, %d in all)",
                            stage.name, step, losses, bad_in_row, skipped)
                if bad_in_row >= tc.max_bad_steps:
                    raise TrainingStopped(f"{stage.name}: {bad_in_row} non-finite losses in a row at step {step} "
                                          f"(train.max_bad_steps={tc.max_bad_steps}); lower the lr "
                                          f"({stage.name}.lr={sc.lr}) or check the data")
                continue  # the same step number is tried again on the next batches
            bad_in_row = 0
            if engine is None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
            if ema is not None:
                ema.update()
            step += 1
            tokens = float(all_reduce_sum(torch.tensor(float(sum(sum(mb.tokens) for mb in micro)))))
            history.append({**losses, "loss": total, "lr": lr, "grad_norm": float(grad_norm)})  # pre-clip norm
            metrics = {**{f"loss/{t}": v for t, v in losses.items()}, "loss/total": total, "lr": lr,
                       "grad_norm": float(grad_norm), "tokens_per_s": tokens / (time.perf_counter() - t0),
                       "packing": stream.packer.stats.utilisation, "skipped": skipped}
            progress.add(history[-1], tokens)
            if world.is_main:
                sink.log(step, metrics)
                if step % tc.log_every == 0 or step == sc.steps:
                    log.info(progress.line(step, lr, metrics["packing"], skipped))
            if any_rank(stop["sigterm"]):
                save(step)
                log.warning("%s: SIGTERM: saved step %d and stopped; run again to resume", stage.name, step)
                interrupted = True
                break
            if tc.eval_every and step % tc.eval_every == 0 and step < sc.steps:
                held_out(step)
            if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step < sc.steps:
                save(step)
        if not interrupted:
            held_out(step)
    finally:
        sink.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)

    for what, c in (("latent cache", pre.latent_cache), ("condition cache", cache)):
        if c is not None:
            log.info("%s: %s: %d hits, %d misses, %d unreadable entries recomputed", stage.name, what,
                     c.stats.hits, c.stats.misses, c.stats.unreadable)
    result = StageResult(stage.name, out, None, step, history, skipped, interrupted, evals=evals)
    if world.is_main:  # for the learning curves: per-step losses and the held-out figures
        atomic_write_text(out / "history.json", json.dumps(history) + "\n")
        if evals:
            atomic_write_text(out / "evals.json", json.dumps(evals, indent=2) + "\n")
    if not interrupted:
        if ckpt.latest(root) is None or ckpt.latest(root).name != f"step_{step:08d}":
            save(step)
        result.model = save_stage_model(module, model, stage, start, out, world, ema, {f"model.{n}" for n in trainable})
    result.seconds = time.perf_counter() - started
    return result


def save_stage_model(module: torch.nn.Module, model: ReasonEditModel, stage: Stage, start: Path, out: Path,
                     world: World, ema: GeneratorEMA | None, trainable: set[str]) -> Path:
    """Write out/model (a full ReasonEditModel folder) and, with an EMA, out/model_ema (EMA generator).
    Sharded weights (FSDP2, ZeRO-3) are gathered first: every rank takes part."""
    full = ckpt.full_trainable_state(module, trainable)
    path = out / "model"
    if world.is_main:
        final = load_stage_model(stage, start)  # unsharded, on the CPU, same structure
        final.load_state_dict({k.removeprefix("model."): v for k, v in full.items()}, strict=False)
        if final.generator is None:  # stage 1: the generator and VAE are carried over from the start model
            carried = ReasonEditModel.from_pretrained(start)
            final = ReasonEditModel(final.reasoner, carried.generator, carried.vae, final.config)
        final.save_pretrained(path)
        if ema is not None and ema.sharded:
            log.warning("%s: the EMA is sharded over the ranks (FSDP2 / ZeRO-3); model_ema/ is not written, the "
                        "EMA shards are in the checkpoint's rank<r>.pt", stage.name)
        elif ema is not None:
            with torch.no_grad():
                for name, p in final.generator.named_parameters():
                    if name in ema.shadow:
                        p.copy_(ema.shadow[name].cpu())
            final.save_pretrained(out / "model_ema")
        (out / "stage.json").write_text(json.dumps({"stage": stage.name, "start": str(start),
                                                    "trains": stage.trains, "from_previous": stage.from_previous},
                                                   indent=2) + "\n")
    barrier()
    return path


__all__ = ["StageModule", "StageResult", "TrainingStopped", "load_stage_model", "step_generator", "train_stage"]
