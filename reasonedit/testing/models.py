"""Tiny models for tests whose outputs must depend on what they are shown."""

from __future__ import annotations

import numpy as np
import torch

from reasonedit.config.model import ModelConfig
from reasonedit.models.model import ReasonEditModel

# replies of every reasoner role that parse, for tests that replace a random model's text
WELL_FORMED = {"think": "make the circle blue", "describe": "a blue circle", "score": "score: 5\nreason: still red",
               "decide": "<#Think> the colour is wrong <#Reflection> make the circle blue"}


def lively_tiny_model(seed: int = 1) -> ReasonEditModel:
    """The tiny model with its reasoner's matrices redrawn larger than a fresh init: a freshly initialised
    reasoner repeats one token whatever it is shown; these weights make its states and greedy replies depend on
    the image and the text, so equal outputs mean equal computations."""
    model = ReasonEditModel.tiny(ModelConfig(), ["make the red circle blue", "remove the star"], seed=0).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.reasoner.model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) * (0.1 if "visual" in name else 0.3))
    return model


def noise_image(height: int, width: int, seed: int) -> np.ndarray:
    """(height, width, 3) uint8 uniform noise from `seed`."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


__all__ = ["WELL_FORMED", "lively_tiny_model", "noise_image"]
