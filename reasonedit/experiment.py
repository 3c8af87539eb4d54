"""`reasonedit run`: carry out an experiment's steps in order, saving everything under output_dir."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from .config import PLANNED_STEPS, ExperimentConfig, save_config
from .data.shapes import ShapesWorld
from .data.shards import MANIFEST
from .errors import NotBuiltError

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    output_dir: Path
    timings: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    agreement: object = None  # data.verify.Agreement of the preview step


def _same_dataset(path: Path, cfg: ExperimentConfig) -> bool:
    manifest = path / MANIFEST
    if not manifest.is_file():
        return False
    doc = json.loads(manifest.read_text())
    want_world = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg.world).items()}
    want_synth = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg.data).items()}
    return doc.get("world") == want_world and doc.get("synth") == want_synth


def step_data(cfg: ExperimentConfig, out: Path, result: RunResult, progress: Callable | None) -> None:
    from .data.synth import synthesize

    path = out / "data"
    if _same_dataset(path, cfg):
        log.info("data: %s already holds this world and data config; reusing it", path)
    else:
        synthesize(path, cfg.data, ShapesWorld(cfg.world), overwrite=True, progress=progress)
    result.artifacts["data"] = str(path)


def step_models(cfg: ExperimentConfig, out: Path, result: RunResult, progress: Callable | None) -> None:
    if cfg.model.source != "tiny":
        # ReasonEditModel.from_diffusers loads such a folder; a run that trains from it comes with the stages
        raise NotBuiltError(f"the models step for model.source={cfg.model.source}", 5)
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


def step_preview(cfg: ExperimentConfig, out: Path, result: RunResult, progress: Callable | None) -> None:
    from .data.preview import dataset_sheet
    from .data.verify import verify_dataset

    data = out / "data"
    sheet = dataset_sheet(data, out / "preview" / "contact_sheet.png", cfg.preview.rows, cfg.preview.split)
    result.artifacts["contact_sheet"] = str(sheet)
    result.agreement = verify_dataset(data)


STEPS = {"data": step_data, "models": step_models, "preview": step_preview}


def run_experiment(tree: DictConfig, cfg: ExperimentConfig, progress: Callable | None = None) -> RunResult:
    """Run every step of `cfg.steps`; a step that is not built yet stops the run before it starts."""
    planned = [s for s in cfg.steps if s in PLANNED_STEPS]
    if planned:
        raise NotBuiltError(f"step {planned[0]!r}", PLANNED_STEPS[planned[0]])
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(tree, out / "config.yaml")
    result = RunResult(out)
    for name in cfg.steps:
        started = time.perf_counter()
        log.info("step %s", name)
        STEPS[name](cfg, out, result, progress)
        result.timings[name] = time.perf_counter() - started
    return result


__all__ = ["RunResult", "STEPS", "run_experiment"]
