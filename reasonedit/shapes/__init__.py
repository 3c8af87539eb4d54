"""The synthetic shapes world: scenes, renders, edits and their phrasing, the dataset synthesiser, the exact
oracle and the exact editor. Only the demo's steps, the shapes benchmark and the tests import it."""

from .oracle import Oracle, OracleReport, SceneError, decide, scene_errors
from .synth import SynthConfig, Synthesizer, synthesize
from .world import Edit, Scene, Shape, ShapesWorld, WorldConfig, apply_edit, apply_edits

__all__ = ["Edit", "Oracle", "OracleReport", "Scene", "SceneError", "Shape", "ShapesWorld", "SynthConfig",
           "Synthesizer", "WorldConfig", "apply_edit", "apply_edits", "decide", "scene_errors", "synthesize"]
