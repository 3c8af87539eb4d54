"""The validation loss: fixed records, noise and timesteps, so it is a function of the model alone."""

import pytest
import torch

from reasonedit.config import load_config
from tests.conftest import ROOT

DEMO = ROOT / "configs" / "experiment" / "shapes_tiny.yaml"


@pytest.fixture(scope="module")
def start_model(tiny_model_dir):
    return tiny_model_dir


@pytest.mark.parametrize("n", [1, 2, 3])
def test_validation_loss_is_repeatable_and_moves_with_the_weights(n, start_model, small_dataset):
    from reasonedit.stages import stage_for
    from reasonedit.stages.validation import validation_batches, validation_losses
    from reasonedit.training import load_stage_model

    _, cfg = load_config(DEMO, ["batches.window=8"])
    stage = stage_for(n, cfg)
    model = load_stage_model(stage, start_model)
    batches = validation_batches(stage, model, cfg, small_dataset, split="val", records_per_kind=4)
    first = validation_losses(stage, model, batches, cfg)
    assert set(first) == set(stage.terms) and all(v > 0 for v in first.values())
    assert validation_losses(stage, model, batches, cfg) == first  # same noise, timesteps and records
    with torch.no_grad():  # move what the stage trains; every term it trains must change
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    moved = validation_losses(stage, model, batches, cfg)
    assert all(moved[t] != first[t] for t in stage.terms), (first, moved)


def test_validation_names_a_missing_split(start_model, small_dataset):
    from reasonedit.stages import stage_for
    from reasonedit.stages.validation import validation_batches
    from reasonedit.training import load_stage_model

    _, cfg = load_config(DEMO)
    stage = stage_for(2, cfg)
    model = load_stage_model(stage, start_model)
    with pytest.raises(Exception, match="nosuch"):
        validation_batches(stage, model, cfg, small_dataset, split="nosuch")
