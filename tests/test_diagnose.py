"""chlib.train.diagnose: a run at chance with a falling loss is called memorising; 2D-FTM scores."""

from __future__ import annotations

import pytest
from helpers import make_tiny_dataset, tiny_config

from chlib.core.config import HParams
from chlib.train.diagnose import memorising, model_free_scores


def _epochs(losses, maps, name="unseen"):
    return [{"epoch": i, "train_total": lo, f"mAP/{name}": m}
            for i, (lo, m) in enumerate(zip(losses, maps, strict=True))]


# the laptop recipe on the FluidSynth suite (runs/A_laptop): loss falls, held-out works at chance
AT_CHANCE = _epochs([4.8, 4.5, 4.2, 3.9, 3.4, 3.0, 2.6], [0.034, 0.033, 0.035, 0.032, 0.029,
                                                         0.028, 0.030])


def test_a_falling_loss_at_chance_is_memorising():
    msg = memorising(AT_CHANCE, ["unseen"])
    assert msg is not None and msg.startswith("memorising, not learning")
    assert "unseen 0.034 -> best 0.035" in msg and "keyed_chroma" in msg


@pytest.mark.parametrize("epochs", [
    _epochs([4.8, 4.5, 4.2, 3.9, 3.4, 3.0, 2.6], [0.08, 0.16, 0.19, 0.21, 0.25, 0.28, 0.29]),  # learns
    AT_CHANCE[:4],  # too early to tell
    _epochs([4.8, 4.7, 4.7, 4.6, 4.6, 4.6, 4.5], [0.03] * 7),  # the loss barely moves: not this
])
def test_learning_or_unclear_runs_are_not_flagged(epochs):
    assert memorising(epochs, ["unseen"]) is None


def test_unwatched_sets_are_ignored():
    assert memorising(AT_CHANCE, ["val_unseen"]) is None


def test_model_free_scores_on_a_tiny_dataset(tmp_path):
    ds = make_tiny_dataset(tmp_path / "ds")
    hp = HParams.from_dict(tiny_config(ds))
    scores = model_free_scores(hp)
    assert set(scores) == {"tiny"} and 0.0 < scores["tiny"]["mAP"] <= 1.0
