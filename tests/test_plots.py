"""chlib.ui.plots: each figure holds the data it was given (points, bars, labels), Agg only."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from chlib.core.errors import ConfigError  # noqa: E402
from chlib.ui import plots  # noqa: E402


def _n_points(ax) -> int:
    return sum(len(c.get_offsets()) for c in ax.collections)


def test_note_name_of_reference_pitches():
    assert plots.note_name(440.0) == "A4"
    assert plots.note_name(32.0) == "C1"  # fmin 32 Hz sits a few cents under C1 (32.70 Hz)
    assert plots.note_name(261.63) == "C4"
    with pytest.raises(ConfigError):
        plots.note_name(0.0)


def test_plot_cqt_axes_span_seconds_and_octaves():
    cqt = np.random.default_rng(0).uniform(-80, 0, size=(250, 96)).astype(np.float32)
    fig = plots.plot_cqt(cqt, frames_per_second=25.0, title="tune")
    ax = fig.axes[0]
    img = ax.images[0]
    assert img.get_array().shape == (96, 250)  # bins up, frames across
    x0, x1, _, _ = img.get_extent()
    assert (x0, x1) == (0.0, 10.0)  # 250 frames at 25 fps = 10 s
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8"]
    assert ax.get_xlabel() == "time (s)"
    assert ax.get_title() == "tune"
    assert len(fig.axes) == 2  # the image and its colour bar


def test_plot_cqt_rejects_1d_input():
    with pytest.raises(ConfigError, match="frames, bins"):
        plots.plot_cqt(np.zeros(10))


def test_plot_cqts_one_panel_per_array_and_crop():
    rng = np.random.default_rng(1)
    cqts = [rng.uniform(-60, 0, size=(n, 24)) for n in (100, 300, 50)]
    fig = plots.plot_cqts(cqts, ["a", "b", "c"], max_seconds=2.0, bins_per_octave=12)
    image_axes = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in image_axes] == ["a", "b", "c"]
    widths = [ax.images[0].get_array().shape[1] for ax in image_axes]
    assert widths == [50, 50, 50]  # 2 s at 25 fps, the shortest already 50 frames
    with pytest.raises(ConfigError, match="2 titles for 3"):
        plots.plot_cqts(cqts, ["a", "b"])


def test_plot_cqts_hides_unused_panels():
    cqts = [np.zeros((10, 12)) - 5 for _ in range(5)]
    fig = plots.plot_cqts(cqts, ncols=3)
    visible = [ax for ax in fig.axes if ax.images and ax.get_visible()]
    hidden = [ax for ax in fig.axes if not ax.get_visible()]
    assert len(visible) == 5 and len(hidden) == 1


def _metrics_rows():
    rows = []
    for epoch in (1, 2, 3):
        for step in range(2):
            rows.append({"kind": "train", "epoch": epoch, "step": epoch * 10 + step,
                         "losses": {"loss": 10.0 - epoch - step, "foc_loss": 5.0}})
        rows.append({"kind": "val", "epoch": epoch, "step": epoch * 10 + 2,
                     "losses": {"loss": 9.0 - epoch}})
        rows.append({"kind": "test", "epoch": epoch, "step": epoch * 10 + 2,
                     "testset": "covers80", "mAP": 0.2 * epoch, "MR1": 5.0})
        rows.append({"kind": "epoch", "epoch": epoch, "step": epoch * 10 + 2})
    return rows


def test_plot_training_curves_averages_train_steps_per_epoch():
    fig = plots.plot_training_curves(_metrics_rows())
    ax_loss, ax_map = fig.axes
    lines = {ln.get_label(): ln for ln in ax_loss.get_lines()}
    assert set(lines) == {"train", "validation"}
    np.testing.assert_allclose(lines["train"].get_xdata(), [1, 2, 3])
    np.testing.assert_allclose(lines["train"].get_ydata(), [8.5, 7.5, 6.5])  # mean of 2 steps
    np.testing.assert_allclose(lines["validation"].get_ydata(), [8.0, 7.0, 6.0])
    (map_line,) = ax_map.get_lines()
    assert map_line.get_label() == "covers80"
    np.testing.assert_allclose(map_line.get_ydata(), [0.2, 0.4, 0.6])


def test_plot_training_curves_from_epoch_records_as_train_writes_them():
    rows = [{"kind": "epoch", "epoch": e, "step": 4 * (e + 1), "lr": 1e-3,
             "train_foc_loss": 5.0 - e, "train_total": 6.0 - e, "val_foc_loss": 5.5 - e,
             "val_total": 6.5 - e, "val_loss": 5.5 - e, "mAP/test": 0.1 * (e + 1),
             "mAP/unseen": 0.05 * (e + 1), "is_best": True} for e in range(3)]
    curves = plots.training_curves(rows)
    assert curves["loss_key"] == "foc_loss"  # the original's val_loss, present in both
    assert curves["train"] == {0: 5.0, 1: 4.0, 2: 3.0}
    assert curves["val"] == {0: 5.5, 1: 4.5, 2: 3.5}
    assert sorted(curves["mAP"]) == ["test", "unseen"]
    fig = plots.plot_training_curves(rows, loss_key="total")
    ax_loss, ax_map = fig.axes
    assert ax_loss.get_ylabel() == "total"
    assert [list(ln.get_ydata()) for ln in ax_loss.get_lines()] == [[6.0, 5.0, 4.0],
                                                                    [6.5, 5.5, 4.5]]
    assert [ln.get_label() for ln in ax_map.get_lines()] == ["test", "unseen"]


def test_plot_training_curves_accepts_top_level_losses_and_no_test_rows():
    rows = [{"kind": "train", "epoch": 1, "step": 1, "loss": 3.0},
            {"kind": "train", "epoch": 2, "step": 2, "loss": 2.0}]
    fig = plots.plot_training_curves(rows)
    ax_loss, ax_map = fig.axes
    assert list(ax_loss.get_lines()[0].get_ydata()) == [3.0, 2.0]
    assert ax_map.get_lines() == []
    assert "no test-set records" in [t.get_text() for t in ax_map.texts]


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_project_embeddings_gives_two_columns(method):
    emb = np.random.default_rng(2).normal(size=(12, 16))
    xy = plots.project_embeddings(emb, method, seed=0)
    assert xy.shape == (12, 2) and np.all(np.isfinite(xy))


def test_project_embeddings_pca_separates_two_clusters():
    rng = np.random.default_rng(3)
    a = rng.normal(0, 0.05, size=(10, 8)) + 5
    b = rng.normal(0, 0.05, size=(10, 8)) - 5
    xy = plots.project_embeddings(np.vstack([a, b]), "pca")
    assert np.sign(xy[:10, 0]).tolist().count(np.sign(xy[0, 0])) == 10
    assert np.all(np.sign(xy[10:, 0]) == -np.sign(xy[0, 0]))


def test_project_embeddings_bad_method_and_nan():
    with pytest.raises(ConfigError, match="pca, tsne or umap"):
        plots.project_embeddings(np.zeros((4, 3)), "mds")
    with pytest.raises(ConfigError, match="NaN"):
        plots.project_embeddings(np.full((4, 3), np.nan), "pca")


def test_plot_embedding_projection_points_rings_and_highlight():
    rng = np.random.default_rng(4)
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 3]
    emb = rng.normal(size=(len(labels), 2))
    fig = plots.plot_embedding_projection(emb, labels, method=None, test_only={2, 3},
                                          label_names={2: "Reel"})
    ax = fig.axes[0]
    by_label = {c.get_label(): len(c.get_offsets()) for c in ax.collections}
    assert by_label == {"0": 3, "1": 2, "Reel": 3, "3": 1, "never seen in training": 4}
    fig2 = plots.plot_embedding_projection(emb, labels, method=None, highlight=[1])
    ax2 = fig2.axes[0]
    alphas = {c.get_label(): c.get_alpha() for c in ax2.collections}
    assert alphas["1"] > alphas["0"]
    assert len(ax2.texts) == 2  # the two points of work 1 are annotated
    assert [t.get_text() for t in ax2.get_legend().get_texts()] == ["1"]


def test_plot_embedding_projection_projects_when_asked():
    emb = np.random.default_rng(5).normal(size=(8, 32))
    fig = plots.plot_embedding_projection(emb, list("aabbccdd"), method="pca")
    assert _n_points(fig.axes[0]) == 8
    with pytest.raises(ConfigError, match="7 labels"):
        plots.plot_embedding_projection(emb, list("aabbccd"), method="pca")


def test_plot_rank_histogram_counts_ranks_and_overflow():
    ranks = [1, 1, 1, 2, 5, 5, 30, 0]
    fig = plots.plot_rank_histogram(ranks, max_rank=10)
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches]
    assert len(heights) == 11
    assert heights[0] == 3 and heights[1] == 1 and heights[4] == 2 and heights[10] == 1
    assert sum(heights) == 7  # the rank-0 query (no relevant ref) is only in the title
    title = ax.get_title()  # the share counts the 7 scorable queries only: 3 of 7 = 43 %
    assert title.startswith("7 queries: 43% correct at rank 1") and "1 left out" in title
    assert ax.get_xticklabels()[-1].get_text() == ">10"


def test_plot_confused_pairs_sorted_largest_first():
    pairs = [("a", "b", 2), {"work_a": "c", "work_b": "d", "count": 7}, ("e", "f", 4)]
    fig = plots.plot_confused_pairs(pairs, top=2)
    ax = fig.axes[0]
    assert [p.get_width() for p in ax.patches] == [7, 4]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[0].startswith("c") and "d" in labels[0]


def test_plot_confused_pairs_accepts_metrics_output():
    from chlib.retrieval.metrics import most_confused_pairs

    dist = np.array([[0.0, 0.1, 0.9], [0.1, 0.0, 0.5], [0.9, 0.5, 0.0]])
    pairs = [(p["query_label"], p["ref_label"], 1 - p["distance"])
             for p in most_confused_pairs(dist, ["x", "y", "z"], k=2)]
    fig = plots.plot_confused_pairs(pairs, value_label="similarity")
    assert len(fig.axes[0].patches) == 2


def test_plot_confused_pairs_names_integer_labels_and_counts_integer_ticks():
    fig = plots.plot_confused_pairs([(3, 4, 2), (1, 3, 1)], label_names={3: "reel", 4: "jig"})
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["reel  ↔  jig", "1  ↔  reel"]
    fig.canvas.draw()
    assert all(float(t).is_integer() for t in ax.get_xticks())


def test_plot_cqt_takes_axes_from_feature_settings():
    from chlib.core.config import FeatureSettings

    fs = FeatureSettings(hop_length=320, fmin=65.4, n_bins=48)  # 50 frames/s, from C2
    fig = plots.plot_cqt(np.zeros((100, 48)) - 3, features=fs)
    ax = fig.axes[0]
    assert ax.images[0].get_extent()[1] == 2.0  # 100 frames at 50 fps
    assert ax.get_yticklabels()[0].get_text() == "C2"


def test_plot_embedding_projection_marks_selection_and_neighbours():
    xy = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    fig = plots.plot_embedding_projection(xy, ["a", "a", "b", "b"], method=None, selected=0,
                                          neighbours=[1, 2])
    ax = fig.axes[0]
    by_label = {c.get_label(): c for c in ax.collections}
    np.testing.assert_allclose(by_label["selected"].get_offsets(), [[0.0, 0.0]])
    np.testing.assert_allclose(by_label["neighbours"].get_offsets(), [[1.0, 0.0], [0.0, 1.0]])
    assert len(ax.get_lines()) == 2  # one line from the selected point to each neighbour


def test_plot_per_work_ap_worst_first_and_top():
    per_work = [{"work": "w1", "ap": 0.9}, {"work": "w2", "ap": 0.1}, {"work": "w3", "ap": 0.5}]
    fig = plots.plot_per_work_ap(per_work, top=2)
    ax = fig.axes[0]
    assert [p.get_width() for p in ax.patches] == [0.1, 0.5]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["w2", "w3"]
    fig2 = plots.plot_per_work_ap({"a": 0.2, "b": 0.8}, worst_first=False)
    assert [t.get_text() for t in fig2.axes[0].get_yticklabels()] == ["b", "a"]


def test_save_figure_writes_png_atomically(tmp_path):
    fig = plots.plot_rank_histogram([1, 2, 3])
    out = plots.save_figure(fig, tmp_path / "sub" / "ranks.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["ranks.png"]  # no temporary left
    with pytest.raises(ConfigError, match=".png"):
        plots.save_figure(fig, tmp_path / "ranks.jpg")
