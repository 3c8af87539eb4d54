"""Data: the synthetic shapes world, the four sample kinds, shards, the exact oracle."""

from .oracle import Oracle, OracleReport, SceneError, decide, scene_errors
from .samples import EditPair, Record, ReflectionSample, TextToImage, ThinkingPair
from .shapes import Edit, Scene, Shape, ShapesWorld, WorldConfig, apply_edit, apply_edits
from .shards import read_records, write_records
from .synth import SynthConfig, Synthesizer, synthesize

__all__ = ["EditPair", "Edit", "Oracle", "OracleReport", "Record", "ReflectionSample", "Scene", "SceneError",
           "Shape", "ShapesWorld", "SynthConfig", "Synthesizer", "TextToImage", "ThinkingPair", "WorldConfig",
           "apply_edit", "apply_edits", "decide", "read_records", "scene_errors", "synthesize", "write_records"]
