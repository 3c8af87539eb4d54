"""`reasonedit run`: carry out an experiment's steps in order, saving everything under output_dir."""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from .config import ExperimentConfig, save_config
from reasonedit.shapes.world import ShapesWorld
from .data.shards import MANIFEST
from .publish import atomic_write_text

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    output_dir: Path
    timings: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    agreement: object = None  # data.verify.Agreement of the preview step
    batches: dict | None = None  # packing figures of the batches step, per stream
    stages: dict = field(default_factory=dict)  # training.StageResult per stage step
    validation: dict = field(default_factory=dict)  # per stage step: {"before": {term: loss}, "after": {...}}
    vae: dict | None = None  # the vae step's report: training time and the held-out read-back (vae/report.json)
    reading: dict | None = None  # the pretrain step's held-out reading accuracy (pretrain/reading.json)
    edits: dict | None = None  # the edit step's traces
    ablation: dict | None = None  # the eval step's table and report paths
    figures: dict | None = None  # the eval step's held-out learning figures of the latest model (eval/figures.json)
    rl_gain: dict | None = None  # the rl step's before/after comparison of the reasoner (rl/gain.json)


def _same_dataset(path: Path, cfg: ExperimentConfig) -> bool:
    manifest = path / MANIFEST
    if not manifest.is_file():
        return False
    doc = json.loads(manifest.read_text())
    want_world = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg.world).items()}
    want_synth = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg.data).items()}
    return doc.get("world") == want_world and doc.get("synth") == want_synth


def step_data(cfg: ExperimentConfig, out: Path, result: RunResult, progress: Callable | None) -> None:
    from reasonedit.shapes.synth import synthesize

    path = out / "data"
    if _same_dataset(path, cfg):
        log.info("data: %s already holds this world and data config; reusing it", path)
    else:
        synthesize(path, cfg.data, ShapesWorld(cfg.world), overwrite=True, progress=progress)
    result.artifacts["data"] = str(path)


def step_models(cfg: ExperimentConfig, out: Path, result: RunResult, progress: Callable | None) -> None:
    if cfg.model.source == "diffusers":
        result.artifacts["model"] = str(reference_start_model(cfg, out / "model"))
        return
    from .data.corpus import dataset_texts
    from .models.model import ReasonEditModel

    data = out / "data"
    if not (data / MANIFEST).is_file():
        raise FileNotFoundError(f"{data} holds no dataset: the models step learns the tokenizer from it, "
                                "so run the data step first (steps: [data, models, ...])")
    model = ReasonEditModel.tiny(cfg.model, dataset_texts(data, split="train"), seed=cfg.seed)
    path = model.save_pretrained(out / "model")
    n = {name: sum(p.numel() for p in part.parameters())
         for name, part in (("reasoner", model.reasoner.model), ("generator", model.generator))}
    log.info("models: tiny reasoner (%d parameters) and generator (%d parameters) saved to %s",
             n["reasoner"], n["generator"], path)
    result.artifacts["model"] = str(path)


def reference_start_model(cfg: ExperimentConfig, path: Path) -> Path:
    """The start model of a run on real weights (model.source=diffusers): a model folder that refers to the
    diffusers folder's parts (model.path, or model.reasoner.path / model.generator.path in their place), with
    the sizes and sigma schedule of those parts and the run's dtype, attention backend and LoRA settings."""
    from .models.diffusers_folder import folder_config, read_folder, start_config
    from .models.model import save_reference

    m = cfg.model
    parts = read_folder(m.path, m.reasoner.path, m.generator.path)
    config, differ = start_config(m, folder_config(parts))
    if differ:
        log.warning("models: the folder's sizes are used where the config's differ (%s)", "; ".join(differ))
    save_reference(path, parts, config)
    log.info("models: %s refers to %s (%s; reasoner %s, generator %s, vae %s); no weights copied", path, parts.path,
             parts.pipeline, parts.text_encoder, parts.transformer, parts.vae)
    return path


def step_vae(cfg: ExperimentConfig, out: Path, result: RunResult, progress: Callable | None) -> None:
    """Tiny presets with a qwen_image VAE: train the models step's VAE on world renders (reasonedit.training.vae);
    the model with the trained VAE goes to vae/model and the held-out oracle read-back to vae/report.json."""
    if cfg.model.vae.kind != "qwen_image" or cfg.model.source != "tiny":
        log.info("vae: nothing to train (model.vae.kind=%s, model.source=%s: only a tiny qwen_image VAE is "
                 "trained here); skipping", cfg.model.vae.kind, cfg.model.source)
        return
    from .models.model import CONFIG_FILE, ReasonEditModel
    from .training.vae import train_vae

    start = out / "model"
    if not (start / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{start} holds no model: the vae step trains the models step's VAE, so run that "
                                "step first (steps: [data, models, vae, ...])")
    model = ReasonEditModel.from_pretrained(start)
    model.vae, report = train_vae(ShapesWorld(cfg.world), model.vae, cfg.vae_train)
    path = model.save_pretrained(out / "vae" / "model")
    doc = {"model": str(path), **report.to_dict()}
    atomic_write_text(out / "vae" / "report.json", json.dumps(doc, indent=2) + "\n")
    result.artifacts["vae"] = str(path)
    result.vae = doc


def step_preview(cfg: ExperimentConfig, out: Path, result: RunResult, progress: Callable | None) -> None:
    from .data.preview import dataset_sheet
    from reasonedit.shapes.verify import verify_dataset

    data = out / "data"
    sheet = dataset_sheet(data, out / "preview" / "contact_sheet.png", cfg.preview.rows, cfg.preview.split)
    result.artifacts["contact_sheet"] = str(sheet)
    result.agreement = verify_dataset(data)


def step_batches(cfg: ExperimentConfig, out: Path, result: RunResult, progress: Callable | None) -> None:
    """One epoch of the train split through the loader, preprocessing and the packer, as stages 1-3
    will see it: the reasoner stream (thinking pairs, reflection samples) and the generator stream
    (edit pairs, text-to-image), each mixed 50/50 and packed into its token budget."""
    from .data.loader import DatasetSpec, make_loader
    from .data.packing import Packer
    from reasonedit.models.preprocess import PreprocessConfig, Preprocessor, buckets_for
    from reasonedit.data.segments import ConditionDropout
    from .models.model import CONFIG_FILE, ReasonEditModel

    b = cfg.batches
    data, model_dir = out / "data", out / "model"
    if not (model_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{model_dir} holds no model: run the models step first (steps: [data, models, ...])")
    model = ReasonEditModel.from_pretrained(model_dir)
    pre = Preprocessor.from_model(model, PreprocessConfig(
        buckets=buckets_for(model, b.pixel_budget), dropout=ConditionDropout(b.text_dropout, b.image_dropout),
        seed=cfg.seed))
    streams = {
        "reasoner": ([("thinking_pair", 0.5), ("reflection", 0.5)], b.reasoner_budget, pre.reasoner_segments),
        "generator": ([("edit_pair", 0.5), ("text_to_image", 0.5)], b.generator_budget, pre.generator_segments),
    }
    report = {}
    for name, (kinds, budget, segments) in streams.items():
        specs = [DatasetSpec(kind, data, split="train", kind=kind, weight=w) for kind, w in kinds]
        loader = make_loader(specs, seed=cfg.seed, epochs=1, shuffle_buffer=b.shuffle_buffer)
        packer = Packer(budget, window=b.window, name=name)
        batches, padded = [], 0
        for sample in loader:
            for segment in segments(sample.record):
                batches += packer.add(segment)
        batches += packer.flush()
        for batch in batches:  # the same items per step, padded to the longest instead of packed
            padded += len(batch.items) * max(n[0] for n in batch.lengths)
        stats = packer.stats
        real = sum(stats.tokens)
        report[name] = {"records": sum(loader.stats().yielded.values()), "segments": stats.items,
                        "batches": stats.batches, "budget": budget, "utilisation": stats.utilisation,
                        "padded_share": 1 - real / padded if padded else 0.0, "oversize": stats.oversize,
                        "skipped_records": loader.stats().total_skipped}
        log.info("batches: %s stream: %s", name, report[name])
    result.batches = report


def _stage_step(number: int) -> Callable:
    def step(cfg: ExperimentConfig, out: Path, result: RunResult, progress: Callable | None) -> None:
        """Train stage N from the previous stage's model (stage 1: the models step's) on the train split."""
        from .models.model import CONFIG_FILE
        from .training import train_stage

        start = initial_model(out) if number == 1 else out / f"stage{number - 1}" / "model"
        if not (start / CONFIG_FILE).is_file():
            before = "models" if number == 1 else f"stage{number - 1}"
            raise FileNotFoundError(f"{start} holds no model: stage{number} starts from the {before} step's "
                                    f"model, so run that step first (steps: [..., {before}, stage{number}])")
        res = train_stage(cfg, number, start, stage_sources(cfg, number, out), out / f"stage{number}",
                          evaluate=_held_out_evaluator(cfg, out, STAGE_PARTS[number]))
        result.stages[f"stage{number}"] = res
        if res.model is not None and launch_rank()[0] == 0:  # the model's validation: the main rank's work
            result.artifacts[f"stage{number}"] = str(res.model)
            result.validation[f"stage{number}"] = _validate_stage(cfg, number, start, res.model, out)
    return step


def stage_name(number: int | str) -> str:
    """The config section and folder of stage `number`: pretrain (0), stage<N>, rl (4 or "rl")."""
    from .stages import STAGES, stage_number

    return STAGES[stage_number(number)].name


def stage_sources(cfg: ExperimentConfig, number: int | str, out: Path) -> list[tuple[Path, float]]:
    """The datasets stage N (0: pretrain, "rl") trains on: its `data` list, or the run's own dataset
    (output_dir/data); the rl stage with rl.prompts: the dataset derived from them (`rl_prompt_dataset`)."""
    name = stage_name(number)
    if name == "rl" and cfg.rl.prompts:  # in place of the stage's datasets
        if cfg.rl.data:
            raise ValueError(f"rl.prompts ({cfg.rl.prompts}) and rl.data ({[s.path for s in cfg.rl.data]}): the "
                             "prompts take the datasets' place; give one of the two")
        return [(rl_prompt_dataset(cfg, out), 1.0)]
    sources = getattr(cfg, name).data
    if not sources:
        if not (out / "data" / MANIFEST).is_file() and "data" not in cfg.steps:
            raise FileNotFoundError(f"{name}.data: empty, and {out / 'data'} holds no dataset; name the "
                                    f"stage's datasets ({name}.data=[{{path: DIR}}]) or add the data step")
        return [(out / "data", 1.0)]
    missing = [s.path for s in sources if not (Path(s.path) / MANIFEST).is_file()]
    if missing:
        raise FileNotFoundError(f"{name}.data: no dataset (no {MANIFEST}) at {missing}; import or synthesise "
                                "it first (reasonedit data import / synth)")
    return [(Path(s.path), s.weight) for s in sources]


# what each stage's held-out evaluation measures (reasonedit.eval.heldout parts)
STAGE_PARTS = {1: ("think", "reflect"), 2: ("generator",), 3: ("generator", "think", "reflect")}


# the folders the models, vae and pretrain steps write, in order: each starts from the last one present before it
MODEL_CHAIN = ("model", "vae/model", "pretrain/model")


def _last_of_chain(out: Path, before: str | None = None) -> Path:
    """The last model folder of MODEL_CHAIN present under `out` (only links before `before`); else out/model."""
    from .models.model import CONFIG_FILE

    links = MODEL_CHAIN if before is None else MODEL_CHAIN[:MODEL_CHAIN.index(before)]
    for link in reversed(links):
        if (out / link / CONFIG_FILE).is_file():
            return out / link
    return out / "model"


def initial_model(out: Path) -> Path:
    """The model stage 1 starts from: pretrain/model (the tiny reasoner's pretraining stand-in) if present, else
    vae/model (the trained tiny VAE), else model/ (the models step's)."""
    return _last_of_chain(out)


def _held_out_evaluator(cfg: ExperimentConfig, out: Path, parts: tuple[str, ...]) -> Callable | None:
    """The trainer's periodic held-out evaluation for shapes runs (train.eval_every), else None."""
    if not cfg.train.eval_every or "val" not in cfg.data.splits or not (out / "data" / MANIFEST).is_file():
        return None
    from .eval.heldout import HeldOut, evaluate

    heldout, world, e = HeldOut.load(out / "data", split="val", n=cfg.eval.heldout), ShapesWorld(cfg.world), cfg.eval
    return lambda model: evaluate(model, heldout, world, parts=parts, steps=e.sampling_steps, guidance=e.guidance,
                                  seed=e.seed)


def _validate_stage(cfg: ExperimentConfig, number: int, start: Path, end: Path, out: Path) -> dict | None:
    """The stage's loss on the val split for the model it started from and the one it saved, with the same
    batches, noise and timesteps; written to <stage name>/validation.json."""
    from .data.loader import kind_specs
    from .stages import stage_for
    from .stages.validation import validation_batches, validation_losses
    from .training.trainer import load_stage_model

    stage = stage_for(number, cfg)
    sources = stage_sources(cfg, number, out)
    if not any(kind_specs(sources, kind, "val") for kind in stage.mix):
        log.info("%s: no val split of its record kinds in its datasets, so no validation loss", stage.name)
        return None
    before = load_stage_model(stage, start)
    batches = validation_batches(stage, before, cfg, sources, split="val")
    report = {"split": "val", "batches": len(batches), "before": validation_losses(stage, before, batches, cfg)}
    del before
    report["after"] = validation_losses(stage, load_stage_model(stage, end), batches, cfg)
    atomic_write_text(out / stage.name / "validation.json", json.dumps(report, indent=2) + "\n")
    log.info("%s: val loss %s", stage.name, ", ".join(
        f"{t} {report['before'][t]:.4f} -> {report['after'][t]:.4f}" for t in stage.terms))
    return report


# what each rl.reward needs of a think prompt's meta, beyond its source image and request
RL_PROMPT_NEEDS = {"oracle": ("target_scene",), "judge": ()}


def rl_prompt_dataset(cfg: ExperimentConfig, out: Path) -> Path:
    """The dataset the rl stage trains on with rl.prompts: each prompt of the file (`data.trajectories.
    read_rl_prompts`, every line checked, and against what rl.reward needs) as a thinking pair whose target is
    its meta.target_scene rendered in cfg.world. Written once to OUTPUT_DIR/rl/prompts-<sha of the file and the
    world> and reused while the file is unchanged; nothing is written when a line is bad."""
    import hashlib

    from reasonedit.shapes.world import Scene

    from .data.trajectories import (PROMPT_DATASET_VERSION, TrajectoryError, prompt_records, read_rl_prompts,
                                    rl_prompts_file, write_prompt_dataset)
    from .eval.images import read_rgb

    r = cfg.rl
    if "think" not in r.roles:
        raise ValueError(f"rl.roles: {list(r.roles)}; rl.prompts holds think prompts (an image and a request), so "
                         "rl.roles must include think")
    if r.mix and set(r.mix) != {"thinking_pair"}:
        raise ValueError(f"rl.mix: {dict(r.mix)}; with rl.prompts the stage trains on their think prompts alone "
                         "(thinking_pair); leave rl.mix unset")
    path = rl_prompts_file(r.prompts)
    prompts = read_rl_prompts(path)  # every time: a reused dataset must suit this run's reward too
    needs = RL_PROMPT_NEEDS.get(r.reward, ())
    world = ShapesWorld(cfg.world)
    targets = {}
    for p in prompts:
        for need in needs:
            if need not in p.meta:
                raise TrajectoryError(f"{path}:{p.line}: field 'meta.{need}' is missing; rl.reward={r.reward} needs "
                                      f"it to score think replies (collect the trajectories from a shapes dataset, "
                                      "or set rl.reward=judge)")
        if "target_scene" in p.meta:
            try:
                targets[p.key] = Scene.from_dict(p.meta["target_scene"])
            except (KeyError, TypeError, ValueError) as e:
                raise TrajectoryError(f"{path}:{p.line}: field 'meta.target_scene' is no shapes scene "
                                      f"({type(e).__name__}: {e})") from None
    world_doc = json.dumps(asdict(cfg.world), sort_keys=True, default=str)
    digest = hashlib.sha256(path.read_bytes() + f"\n{world_doc}\n{PROMPT_DATASET_VERSION}".encode()).hexdigest()
    folder = out / "rl" / f"prompts-{digest[:16]}"
    if (folder / MANIFEST).is_file():
        log.info("rl: %s already holds the %d prompts of %s; reusing it", folder, len(prompts), path)
        return folder

    def target(p):
        return world.render(targets[p.key]) if p.key in targets else None

    write_prompt_dataset(folder, prompt_records(prompts, read_rgb, target),
                         {"rl_prompts": {"file": str(path.resolve()), "sha256": digest, "prompts": len(prompts)},
                          "world": json.loads(world_doc)})
    log.info("rl: %d prompts of %s written as thinking pairs to %s", len(prompts), path, folder)
    return folder


def rl_start(out: Path) -> Path:
    """The model the rl stage starts from: stage3/model when present, else stage1/model."""
    from .models.model import CONFIG_FILE

    return out / "stage3" / "model" if (out / "stage3" / "model" / CONFIG_FILE).is_file() else out / "stage1" / "model"


def description_parts(text: str) -> set[str]:
    """A scene description's parts (`shapes.language.describe`: "A <colour> background with N shapes: a <shape>
    <place>; ..."): its background and each shape with its place, as comparable strings."""
    head, _, listing = text.strip().rstrip(".").partition(":")
    background = re.search(r"\b(\w+) background\b", head)
    parts = {f"background {background.group(1).lower()}"} if background else set()
    return parts | {p.strip().lower() for p in listing.split(";") if p.strip()}


def progress(score: float, source_score: float, best: float = 10.0) -> float:
    """The share of the way from the source's score to `best` an edit went, floored at 0 (1 when the source was
    already right and stays so)."""
    if source_score >= best:
        return 1.0 if score >= best else 0.0
    return max(0.0, (score - source_score) / (best - source_score))


class ShapesReward:
    """The rl stage's reward on shapes data (`stages.rl.RewardFn`), each in [0, 1].

    think: the editor (`rl.editor`: the exact shapes editor, with `rl.error_rate` of its requests done wrong on
        purpose; the start model's generator; an HTTP editing service) executes the reply on the record's image and
        the oracle scores the result against the record's target scene; the reward is the
        share of the way from the source's score to 10 the result went, (score - source's) / (10 - source's),
        floored at 0: doing nothing (an unparsable reply leaves the source) earns 0, not the source's 6-7 of 10;
        parsed when the editor could execute it.
    describe: the share of the expected description's parts (background, each shape with its place) and the reply's
        that agree, |both| / |either|; parsed when it names a background.
    score: 1 - |score - the record's| / 10; parsed when it is "score: N / reason: ...".
    decide: 1 when the reply's decision is the record's; parsed when it is a well-formed decision.
    With a `judge` (rl.reward=judge) the executed think reply is scored by it instead of the oracle: its score of
    (source, result) for the record's instruction, / 10."""

    def __init__(self, world: ShapesWorld, error_rate: float = 0.0, seed: int = 0, editor=None, *,
                 steps: int = 12, guidance: float = 4.0, judge=None, judge_key: str = "rl.judge_url"):
        """editor: any `Editor` (the start model's generator, an HTTP editing service) to execute think replies
        with; None: the exact shapes editor, wrong on purpose on `error_rate` of its edits. `steps` and `guidance`
        go with each request to an editor that samples. judge: a `eval.trajectories.JudgeScorer`; a request it
        gets no reply to stops the run with an error naming `judge_key` (a reward of 0 would be a wrong signal)."""
        from reasonedit.shapes.editor import ShapesEditor
        from reasonedit.shapes.oracle import Oracle

        self.exact = ShapesEditor(world, error_rate=error_rate, seed=seed)
        self.editor = editor or self.exact
        self.oracle = Oracle(world)
        self.world, self.seed, self.steps, self.guidance = world, seed, steps, guidance
        self.judge, self.judge_key = judge, judge_key

    def close(self) -> None:
        if self.judge is not None:
            self.judge.judge.close()

    def _judged(self, think: list, executed: dict) -> dict:
        """The judge's reward and parsed flag for each think rollout (by id), all asked at once."""
        from .eval.judge import JudgeError

        scored = self.judge.score_all([(r.meta["instruction"], r.meta["image"], executed[id(r)][0]) for r in think])
        failed = [error for _, _, error in scored if error is not None]
        if failed:
            raise JudgeError(f"{self.judge_key}: the judge gave no reply to {len(failed)} of {len(think)} think "
                             f"rollouts ({failed[0]}); check that it is up at {self.judge_key}, or raise "
                             f"rl.judge_timeout / rl.judge_retries")
        out = {}
        for r, (score, reason, _) in zip(think, scored):
            if score is None:
                log.warning("rl reward: %s: %s; rewarded 0", r.key, reason)
            out[id(r)] = (0.0 if score is None else score / 10.0, executed[id(r)][1])
        return out

    def _execute(self, think: list) -> list[tuple]:
        """(edited image, parsed) for each think rollout; an editor other than the shapes editor gets them as one
        batch, and a reply is parsed when the shapes grammar reads it."""
        import numpy as np

        from .inference.types import EditRequest

        if self.editor is self.exact:
            out = []
            for r in think:
                outcome = self.exact.outcome(EditRequest(image=r.meta["image"], prompt=r.reply))
                parsed = outcome.unparsed is None
                out.append((self.world.render(outcome.result) if parsed else r.meta["image"], parsed))
            return out
        requests = [EditRequest(image=r.meta["image"], prompt=r.reply, seed=self.seed, guidance_scale=self.guidance,
                                num_inference_steps=self.steps) for r in think]
        edited = self.editor.edit(requests) if requests else []
        return [(np.asarray(image), self.exact.outcome(EditRequest(image=r.meta["image"], prompt=r.reply)).unparsed
                 is None) for r, image in zip(think, edited)]

    def __call__(self, rollouts):
        from reasonedit.shapes.world import Scene
        from .models.prompts import ThinkerReplyError, parse_decision, parse_score
        from .stages.rl import Reward

        think = [r for r in rollouts if r.role == "think"]
        executed = dict(zip(map(id, think), self._execute(think)))
        judged = self._judged(think, executed) if self.judge is not None and think else {}
        records: dict[str, tuple] = {}  # a group's replies share their record: its target and source score once

        def record(r) -> tuple:
            if r.meta["key"] not in records:
                target = r.meta["meta"].get("target_scene")
                target = Scene.from_dict(target) if target else self.oracle.read(r.meta["target"]).scene
                records[r.meta["key"]] = target, self.oracle.score(r.meta["image"], target).score
            return records[r.meta["key"]]

        out = []
        for r in rollouts:
            if r.role == "think" and judged:
                out.append(Reward(*judged[id(r)]))
            elif r.role == "think":
                edited, parsed = executed[id(r)]
                target, source_score = record(r)
                out.append(Reward(progress(self.oracle.score(edited, target).score, source_score), parsed))
            elif r.role == "decide":
                try:
                    kind = parse_decision(r.reply).kind
                except ThinkerReplyError:
                    out.append(Reward(0.0, False))
                    continue
                out.append(Reward(float(kind == r.meta["decision"]), True))
            elif r.role == "describe":
                got, want = description_parts(r.reply), description_parts(r.meta["target_description"])
                named = any(p.startswith("background ") for p in got)
                out.append(Reward(len(got & want) / len(got | want) if got | want else 0.0, named))
            elif r.role == "score":
                try:
                    value, _ = parse_score(r.reply)
                except ThinkerReplyError:
                    out.append(Reward(0.0, False))
                    continue
                out.append(Reward(1.0 - abs(value - int(r.meta["score"])) / 10.0, True))
            else:
                raise ValueError(f"rl reward: no reward for role {r.role!r} ({r.key})")
        return out


def rl_reward(cfg: ExperimentConfig, start: Path | None = None, judge_cache: Path | None = None):
    """The rl stage's reward (`ShapesReward` in `cfg.world`) with `cfg.rl.editor` executing think replies: the exact
    shapes editor, the generator of the model folder `start` ("model": it samples with the eval section's steps
    and guidance on `eval.device`), or an HTTP editing service; scored by the oracle, or with rl.reward=judge by
    the judge at rl.judge_url (its replies cached in `judge_cache`, default OUTPUT_DIR/rl/judge_cache.jsonl)."""
    from .inference.pipeline import Pipeline, build_editor
    from .models.model import CONFIG_FILE

    r, e, world = cfg.rl, cfg.eval, ShapesWorld(cfg.world)
    judge = rl_judge(cfg, judge_cache) if r.reward == "judge" else None
    if r.editor == "shapes":
        return ShapesReward(world, r.error_rate, seed=cfg.seed, judge=judge)
    if r.editor == "model":
        if start is None or not (Path(start) / CONFIG_FILE).is_file():
            raise ValueError(f"rl.editor: 'model' edits with the start model's generator; {start} is no model folder")
        editor = Pipeline.load(start, device=e.device, dtype=e.dtype).editor()
    else:
        editor = build_editor(r.editor)
    return ShapesReward(world, seed=cfg.seed, editor=editor, steps=e.sampling_steps, guidance=e.guidance, judge=judge)


def rl_judge(cfg: ExperimentConfig, cache: Path | None = None):
    """The judge rl.reward=judge scores think rollouts with (`eval.trajectories.JudgeScorer` over `eval.judge`):
    rl.judge_url, rl.judge_model (else REASONEDIT_JUDGE_MODEL / OPENAI_MODEL), its timeout, retries and concurrency."""
    from .eval.judge import Judge, JudgeSettings
    from .eval.trajectories import JudgeScorer

    r = cfg.rl  # validated: rl.reward=judge has an http(s) rl.judge_url
    try:
        settings = JudgeSettings.resolve(r.judge_url, r.judge_model or None, None, timeout=r.judge_timeout,
                                         retries=r.judge_retries, concurrency=r.judge_concurrency)
    except ValueError as err:
        raise ValueError(f"rl.judge_model: {err} (or set rl.judge_model)") from None
    cache = cache if cache is not None else Path(cfg.output_dir) / "rl" / "judge_cache.jsonl"
    return JudgeScorer(Judge(settings, cache=cache))


def step_rl(cfg: ExperimentConfig, out: Path, result: RunResult, progress: Callable | None) -> None:
    """GRPO on the reasoner's LoRA (the rl stage) from the stage-3 model (else stage 1's), rewarded by
    `rl_reward`; writes rl/ (checkpoints, model, history.json, curves.png)."""
    from .models.model import CONFIG_FILE
    from .training import train_stage

    start = rl_start(out)
    if not (start / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{start} holds no model: rl starts from the stage3 (else stage1) step's model, so "
                                "run one of them first (steps: [..., stage1, rl])")
    reward = rl_reward(cfg, start)
    try:
        res = train_stage(cfg, "rl", start, stage_sources(cfg, "rl", out), out / "rl", reward=reward)
    finally:
        reward.close()
    result.stages["rl"] = res
    if res.model is not None and launch_rank()[0] == 0:
        result.artifacts["rl"] = str(res.model)
        if (out / "rl" / "curves.png").is_file():
            result.artifacts["rl_curves"] = str(out / "rl" / "curves.png")
        result.rl_gain = _rl_gain(cfg, out, start, res.model)


def _rl_gain(cfg: ExperimentConfig, out: Path, start: Path, trained: Path) -> dict | None:
    """The start (SFT) reasoner against the rl step's on `rl.heldout` test samples of each kind, the shapes editor
    wrong on `rl.heldout_error_rate` of its edits (`reasonedit.eval.rl_gain`); rl/gain.json and rl/gain.md. None
    when skipped (rl.heldout 0, or no test split)."""
    from .eval.rl_gain import compare_reasoners, gain_table

    r = cfg.rl
    if not r.heldout or _held_out(cfg, out) is None:
        return None
    t0 = time.perf_counter()
    doc = compare_reasoners({"sft": start, "rl": trained}, out / "data", ShapesWorld(cfg.world), out / "rl" / "gain",
                            n=r.heldout, error_rate=r.heldout_error_rate, rounds=r.heldout_rounds, seed=cfg.seed,
                            device=cfg.eval.device)
    doc["seconds"] = time.perf_counter() - t0
    atomic_write_text(out / "rl" / "gain.json", json.dumps(doc, indent=2) + "\n")
    table = gain_table(doc)
    atomic_write_text(out / "rl" / "gain.md", f"# What the rl stage added\n\n{table}\n")
    log.info("rl: what the rl stage added (%d test samples of each kind, shapes editor wrong on %.0f %%):\n%s",
             r.heldout, 100 * r.heldout_error_rate, table)
    return doc


def pretrain_start(out: Path) -> Path:
    """The model the pretrain step starts from: vae/model (the trained tiny VAE) when present, else model/."""
    return _last_of_chain(out, before="pretrain/model")


def step_pretrain(cfg: ExperimentConfig, out: Path, result: RunResult, progress: Callable | None) -> None:
    """What stands in for Qwen2.5-VL's pretraining on tiny presets: stage 0 (`reasonedit.stages.pretrain`) fully
    fine-tunes the tiny reasoner, vision tower included, on captions and scene questions of the train split,
    saves pretrain/model (generator and VAE carried over) and writes its held-out reading accuracy to
    pretrain/reading.json. A released Qwen2.5-VL (model.source != tiny) comes pretrained: the step is skipped."""
    from reasonedit.models.preprocess import PreprocessConfig, Preprocessor, buckets_for
    from reasonedit.data.segments import ConditionDropout
    from .models.model import CONFIG_FILE, ReasonEditModel
    from .stages.pretrain import heldout_scene_records, reading_accuracy
    from .training import train_stage

    if cfg.model.source != "tiny":
        log.info("pretrain: skipped: model.source=%s is a released Qwen2.5-VL, which comes pretrained",
                 cfg.model.source)
        return
    start = pretrain_start(out)
    if not (start / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{start} holds no model: pretrain starts from the models (or vae) step's model, "
                                "so run that step first (steps: [data, models, pretrain, ...])")
    split, records = heldout_scene_records(out / "data", cfg.pretrain.reading_scenes)
    world = cfg.world

    def read(model: ReasonEditModel):
        pre = Preprocessor.from_model(model, PreprocessConfig(
            buckets=buckets_for(model, cfg.batches.pixel_budget), dropout=ConditionDropout(0.0, 0.0), seed=cfg.seed))
        return reading_accuracy(model, records, world, pre, seed=cfg.seed)

    # with train.eval_every, the trainer logs the reading accuracy as training goes (pretrain/evals.json)
    evaluate = (lambda model: read(model).accuracy) if records and cfg.train.eval_every else None
    res = train_stage(cfg, 0, start, stage_sources(cfg, 0, out), out / "pretrain", evaluate=evaluate)
    result.stages["pretrain"] = res
    if res.model is None:
        return
    result.artifacts["pretrain"] = str(res.model)
    result.validation["pretrain"] = _validate_stage(cfg, 0, start, res.model, out)
    if not records:
        log.info("pretrain: no held-out text-to-image records (data.splits, pretrain.reading_scenes), so no reading "
                 "accuracy")
        return
    report = read(ReasonEditModel.from_pretrained(res.model, components=("reasoner",)))
    doc = {"model": str(res.model), "split": split, "scenes": len(records), **report.to_dict()}
    atomic_write_text(out / "pretrain" / "reading.json", json.dumps(doc, indent=2) + "\n")
    result.reading = doc
    log.info("pretrain: reads the world: %s (%d %s scenes)", report.line(), len(records), split)


def latest_model(out: Path) -> Path:
    """The run's most trained model with a generator: rl (when it carries one: it ran after stage 2 or 3), stage3,
    stage2, else the models step's."""
    from .models.model import CONFIG_FILE

    rl = out / "rl" / "model"
    if (rl / CONFIG_FILE).is_file() and "generator" in json.loads((rl / CONFIG_FILE).read_text()).get("components", []):
        return rl
    for candidate in (out / "stage3" / "model", out / "stage2" / "model", out / "model"):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    raise FileNotFoundError(f"{out} holds no model yet: run the models step (or a stage) before edit and eval")


def _held_out(cfg: ExperimentConfig, out: Path) -> Path | None:
    """The run's dataset when it has a test split, else None: the shapes benchmark then makes its scenes from
    a seed of its own, disjoint from training."""
    return out / "data" if "test" in cfg.data.splits and (out / "data" / MANIFEST).is_file() else None


def step_edit(cfg: ExperimentConfig, out: Path, result: RunResult, progress: Callable | None) -> None:
    """think -> edit -> reflect on held-out concrete and abstract scenes; a trace folder (images, trace.json,
    index.html, contact sheet) per sample under edit/, as `reasonedit edit` writes one."""
    from .eval.benchmarks.shapes import ShapesBenchmark
    from .inference.pipeline import Pipeline
    from .inference.report import write_trace

    e = cfg.edit
    model_dir = latest_model(out)
    pipeline = Pipeline.load(model_dir, device=e.device, dtype=e.dtype)
    bench = ShapesBenchmark(n=e.samples, world=ShapesWorld(cfg.world)).load(_held_out(cfg, out))
    picked = []
    for category in ("concrete", "abstract"):
        picked += [s for s in bench.samples() if s.category == category][: e.samples]
    traces = pipeline.edit_with_reasoning([bench.source_images(s)[0] for s in picked], [s.instruction for s in picked],
                                          think=True, reflect=True, rounds=e.rounds, seed=e.seed,
                                          guidance_scale=e.guidance, num_inference_steps=e.sampling_steps, loop=e.loop)
    rows = []
    for sample, trace in zip(picked, traces):
        folder = write_trace(trace, out / "edit" / sample.key)
        best = trace.rounds[trace.best]
        oracle = bench.oracle_scores(sample, folder / "final.png")  # the held-out target's exact verdict
        rows.append({"key": sample.key, "category": sample.category, "instruction": sample.instruction,
                     "thought": trace.thought, "rounds": len(trace.rounds), "stopped": trace.stopped,
                     "best_round": best.index, "best_score": best.score, "parse_errors": trace.parse_errors,
                     "oracle_success": bool(oracle["success"]), "oracle_score": oracle["score"],
                     "trace": str(folder)})
    result.edits = {"model": str(model_dir), "samples": rows}
    log.info("edit: %d traces under %s (model %s)", len(rows), out / "edit", model_dir)


def _stale_eval(eval_dir: Path, model_dir: Path, e) -> bool:
    """True when eval_dir holds images made by another save of the model than model_dir's, or with other
    sampling settings than `e` (the eval section)."""
    from .eval.runner import STAMP, model_identity
    want = {"origin": model_identity(model_dir), "steps": e.sampling_steps, "guidance": e.guidance, "seed": e.seed}
    for stamp in eval_dir.glob(f"images/*/*/{STAMP}"):
        try:
            made = json.loads(stamp.read_text())
        except (OSError, ValueError):
            return True
        if any(made.get(k) != v for k, v in want.items()) or made.get("rounds") not in (None, e.rounds):
            return True
        if made.get("mode") != "base" and made.get("loop", "reasonedit") != e.loop:
            return True
    return False


def step_eval(cfg: ExperimentConfig, out: Path, result: RunResult, progress: Callable | None) -> None:
    """The shapes ablation of the run's latest model: success and mean oracle score per mode, on concrete
    and abstract instructions (eval/report.md, results.json, charts)."""
    import logging as logging_module

    from .eval.ablation import run_shapes_ablation

    e = cfg.eval
    model_dir = latest_model(out)
    stale = _stale_eval(out / "eval", model_dir, e)
    if stale:  # the model was saved again, or the settings changed: old images must not be reused
        log.info("eval: %s holds images of an earlier model; removing them", out / "eval")
        shutil.rmtree(out / "eval")
    # an undertrained reasoner's unparsable replies are counted in the table; one warning each is noise here
    quiet = logging_module.getLogger("reasonedit.inference.builtin")
    level = quiet.level
    quiet.setLevel(logging_module.ERROR)
    tables = []
    try:
        for editor in e.editors:  # the run's generator, and/or the exact shapes editor (the reasoner alone)
            where = out / "eval" if editor == "model" else out / "eval" / "shapes_editor"
            rate = e.shapes_error_rate if editor == "shapes" else 0.0
            ablation = run_shapes_ablation(model_dir, _held_out(cfg, out), where, modes=list(e.modes), limit=e.limit,
                                           steps=e.sampling_steps, rounds=e.rounds, guidance=e.guidance, seed=e.seed,
                                           editor=editor, error_rate=rate, device=e.device, dtype=e.dtype,
                                           loop=e.loop)
            tables.append({"editor": ablation.editor, "thinker": ablation.thinker, "table": ablation.table,
                           "parse_errors": ablation.parse_errors,
                           "paths": {k: str(v) for k, v in ablation.paths.items()}})
    finally:
        quiet.setLevel(level)
    result.ablation = {"model": str(model_dir), "table": tables[0]["table"], "parse_errors": tables[0]["parse_errors"],
                       "paths": tables[0]["paths"], "tables": tables}
    from .eval.curves import plot_curves

    result.figures = _final_figures(cfg, out, model_dir)
    curves = plot_curves(out)
    if curves is not None:
        result.artifacts["curves"] = str(curves)


def _final_figures(cfg: ExperimentConfig, out: Path, model_dir: Path) -> dict | None:
    """The learning figures of the run's latest model on the test split (eval.limit records of each kind),
    written to eval/figures.json; None without a test split."""
    from .eval.heldout import HeldOut, evaluate
    from .inference.pipeline import Pipeline

    if _held_out(cfg, out) is None:
        return None
    e = cfg.eval
    heldout = HeldOut.load(out / "data", split="test", n=e.limit)
    model = Pipeline.load(model_dir, device=e.device, dtype=e.dtype).model  # where the eval step's models run
    figures = evaluate(model, heldout, ShapesWorld(cfg.world), steps=e.sampling_steps, guidance=e.guidance, seed=e.seed)
    doc = {"model": str(model_dir), "split": "test", "samples": {"edits": len(heldout.edits),
           "thinking": len(heldout.thinking), "reflections": len(heldout.reflections)}, "figures": figures}
    atomic_write_text(out / "eval" / "figures.json", json.dumps(doc, indent=2) + "\n")
    return doc


STEPS = {"data": step_data, "models": step_models, "vae": step_vae, "pretrain": step_pretrain,
         "batches": step_batches, "preview": step_preview,
         "stage1": _stage_step(1), "stage2": _stage_step(2), "stage3": _stage_step(3), "rl": step_rl,
         "edit": step_edit, "eval": step_eval}


def preflight(cfg: ExperimentConfig, out: Path) -> None:
    """What can be checked before the first step runs: a diffusers model folder and its parts (their config
    files, not their weights), and every stage's datasets. Each error names the key, the folder and the part."""
    if cfg.model.source == "diffusers" and "models" in cfg.steps:
        from .models.diffusers_folder import folder_config, read_folder
        m = cfg.model
        folder_config(read_folder(m.path, m.reasoner.path, m.generator.path))
    for number in (1, 2, 3, "rl"):
        if stage_name(number) in cfg.steps:
            stage_sources(cfg, number, out)


# the steps every rank of a torchrun / deepspeed launch runs together (each trains on its share of the data); every
# other step (data, models, vae, pretrain, batches, preview, edit, eval, and a stage's validation) is the main
# rank's alone while the other ranks wait for the next training step or, after the last one, are done
RANK_STEPS = ("stage1", "stage2", "stage3", "rl")
STEP_WAIT = datetime.timedelta(days=7)  # how long the other ranks wait for the main rank's steps


def launch_rank() -> tuple[int, int]:
    """(rank, world size) of this process in a torchrun / deepspeed launch; (0, 1) alone."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _step_group():
    """A gloo group for waiting on the main rank's steps, whose timeout outlasts them (an eval or a data step can
    take hours, far past the training group's collective timeout)."""
    import torch.distributed as dist

    from .training.distributed import init_world
    init_world()
    return dist.new_group(backend="gloo", timeout=STEP_WAIT)


def run_experiment(tree: DictConfig, cfg: ExperimentConfig, progress: Callable | None = None) -> RunResult:
    """Run every step of `cfg.steps`, in order, after checking what the steps will read (preflight). Under torchrun
    the training steps run on every rank and the others on the main rank (`RANK_STEPS`)."""
    import torch.distributed as dist

    rank, world_size = launch_rank()
    preflight(cfg, Path(cfg.output_dir))
    out = Path(cfg.output_dir)
    group = _step_group() if world_size > 1 else None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(tree, out / "config.yaml")
    result = RunResult(out)
    last = max((i for i, name in enumerate(cfg.steps) if name in RANK_STEPS), default=-1)
    for i, name in enumerate(cfg.steps):
        together = name in RANK_STEPS
        if group is not None and together:
            dist.barrier(group=group)  # the main rank's steps before this one are done
        if rank != 0 and not together:
            if i > last:
                log.info("rank %d: done; the main rank runs %s", rank, ", ".join(cfg.steps[i:]))
                break
            continue
        started = time.perf_counter()
        log.info("step %s", name)
        STEPS[name](cfg, out, result, progress)
        result.timings[name] = time.perf_counter() - started
    return result


__all__ = ["RANK_STEPS", "RL_PROMPT_NEEDS", "RunResult", "STEPS", "ShapesReward", "launch_rank", "latest_model",
           "pretrain_start", "rl_judge", "rl_prompt_dataset", "rl_reward", "rl_start", "run_experiment", "stage_name",
           "step_pretrain", "step_rl"]
