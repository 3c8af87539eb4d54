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
        raise NotBuiltError(f"loading model.source={cfg.model.source} weights", 3)
    import shutil

    from .data.corpus import dataset_texts
    from .models.tiny import build_tiny_reasoner

    data = out / "data"
    if not (data / MANIFEST).is_file():
        raise FileNotFoundError(f"{data} holds no dataset: the models step learns the tokenizer from it, "
                                "so run the data step first (steps: [data, models, ...])")
    r = cfg.model.reasoner
    path = out / "models" / "reasoner"
    if path.exists():
        shutil.rmtree(path)
    build_tiny_reasoner(path, dataset_texts(data, split="train"), vocab_size=r.vocab_size, seed=cfg.seed,
                        hidden_size=r.hidden_size, num_layers=r.num_layers, num_heads=r.num_heads,
                        num_kv_heads=r.num_kv_heads, intermediate_size=r.intermediate_size,
                        vision_depth=r.vision_depth, vision_hidden_size=r.vision_hidden_size,
                        vision_heads=r.vision_heads, vision_intermediate_size=r.vision_intermediate_size)
    result.artifacts["reasoner"] = str(path)


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
