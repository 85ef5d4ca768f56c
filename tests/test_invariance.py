"""chlib.retrieval.invariance: one factor changed at a time; the curves see what a model ignores."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import N_BINS, StandIn, tiny_config

from chlib.core.config import HParams
from chlib.core.errors import ConfigError
from chlib.retrieval.invariance import change_one_factor, invariance_curves


def _recordings(n: int = 12, frames: int = 120) -> list[np.ndarray]:
    """``n`` recordings, each a steady random spectral profile (dB) with frame-to-frame noise."""
    rng = np.random.default_rng(3)
    return [np.minimum(0.0, rng.uniform(-60, 0, N_BINS)[None, :]
                       + rng.normal(0, 2, (frames, N_BINS))).astype(np.float32) for _ in range(n)]


@pytest.mark.parametrize("factor, value", [("transpose", 0), ("tempo", 1.0), ("timbre", 0),
                                           ("excerpt", 1.0)])
def test_identity_values_change_nothing(factor, value):
    x = _recordings(1)[0]
    assert np.array_equal(change_one_factor(x, factor, value, rng=np.random.default_rng(0)), x)


def test_each_factor_changes_what_it_says():
    x = np.full((100, N_BINS), -100.0, dtype=np.float32)
    x[:, 2] = 0.0
    rng = np.random.default_rng(0)
    assert change_one_factor(x, "transpose", 3, rng=rng)[:, 5].max() == 0.0
    assert change_one_factor(x, "tempo", 0.8, rng=rng).shape == (125, N_BINS)  # slower = longer
    assert change_one_factor(x, "excerpt", 0.5, rng=rng).shape == (50, N_BINS)
    noisy = change_one_factor(x, "noise", 10, rng=rng)
    assert np.median(noisy[:, 7]) > -60 and np.all(noisy >= x - 1e-4)
    eq = change_one_factor(x, "timbre", 12, rng=rng)
    assert np.abs(eq[:, 2]).max() <= 12 + 1e-4
    with pytest.raises(ConfigError, match="unknown factor"):
        change_one_factor(x, "reverb", 1, rng=rng)


def test_curves_show_a_time_blind_model_is_tempo_invariant_but_not_key_invariant():
    hp = HParams.from_dict(tiny_config(chunk_frame=[60]))
    table = invariance_curves(StandIn(n_bins=N_BINS, centre=False), _recordings(), hp,
                              factors={"tempo": [1.0, 0.8], "transpose": [0, 5]})
    top1 = table.set_index(["factor", "value"])["top1"]
    assert top1[("tempo", 1.0)] == 1.0 and top1[("transpose", 0)] == 1.0
    assert top1[("tempo", 0.8)] >= 0.9  # mean and std over time barely move with tempo
    assert top1[("transpose", 5)] <= 0.5  # but the spectral profile moves with the key
    assert set(table.columns) >= {"top1", "mean_rank", "distance", "chance"}
    assert table["chance"].iloc[0] == pytest.approx(1 / 12)


def test_invariance_figure_has_one_panel_per_factor(tmp_path):
    import pandas as pd

    from chlib.ui import report

    table = pd.DataFrame([{"factor": f, "value": v, "top1": 1.0 - v / 10, "chance": 0.1,
                           "mean_rank": 1.0, "distance": 0.1}
                          for f in ("transpose", "tempo") for v in (0, 1, 2)])
    fig = report.invariance_figure(table, save_dir=tmp_path)
    assert [ax.get_title() for ax in fig.axes] == ["transpose", "tempo"]
    assert (tmp_path / "invariance.png").stat().st_size > 1000
    five = pd.concat([table.assign(factor=f) for f in
                      ("transpose", "tempo", "timbre", "noise", "excerpt")])
    fig = report.invariance_figure(five)  # rows of 3: at most 9 inches wide, readable in a notebook
    shown = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert shown == ["transpose", "tempo", "timbre", "noise", "excerpt"]
    assert fig.get_size_inches()[0] <= 9.0 and len(fig.axes) == 6
