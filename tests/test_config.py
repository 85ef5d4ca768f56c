"""chlib.core.config: typed settings, derived values, clear errors for unknown keys and bad values."""

from pathlib import Path

import pytest
import yaml

from chlib.core.config import (
    FeatureSettings,
    HParams,
    PrepConfig,
    load_hparams,
    load_prep_config,
    save_hparams,
)
from chlib.core.errors import ConfigError

GOLDEN_HP = Path(__file__).resolve().parents[2] / "shared/fixtures/coverhunter_golden/config/hparams.yaml"


def test_feature_settings_derived_values():
    fs = FeatureSettings()
    assert fs.frames_per_second == 25.0
    assert fs.fmax == pytest.approx(32 * 2 ** (95 / 12))
    assert FeatureSettings(hop_length=320).frames_per_second == 50.0


def test_feature_settings_reject_bins_above_nyquist():
    with pytest.raises(ConfigError, match="Nyquist"):
        FeatureSettings(n_bins=120).validate()


@pytest.mark.skipif(not GOLDEN_HP.exists(), reason="shared fixtures not present")
def test_original_fork_config_loads_with_derived_chunk_seconds():
    hp = load_hparams(GOLDEN_HP)
    assert hp.chunk_s == 135.0  # 1125 x 3 / 25
    assert hp.chunk_len == [3375, 2700, 2025]
    assert hp.chunk_seconds == [135.0, 108.0, 81.0]
    assert hp.model.num_classes == 50 and hp.model.center_weight == 0.01
    assert set(hp.testsets) == {"covers80"}
    assert hp.testsets["covers80"].query_path == "data/covers80_testset/full.txt"


def _base() -> dict:
    return {"train_path": "t.txt", "chunk_frame": [250, 200], "mean_size": 3, "batch_size": 16,
            "m_per_class": 4, "foc": {"output_dims": 10, "weight": 1.0, "gamma": 2}}


def test_original_ce_block_is_accepted_as_focal_block():
    d = _base()
    d["ce"] = d.pop("foc")
    hp = HParams.from_dict(d)
    assert hp.model.num_classes == 10


def test_unknown_key_names_the_key_and_suggests_the_close_one():
    d = _base()
    d["learning_rte"] = 0.1
    with pytest.raises(ConfigError, match="learning_rte.*learning_rate"):
        HParams.from_dict(d, where="runs/x/config/hparams.yaml")


def test_unknown_nested_key_is_an_error():
    d = _base()
    d["encoder"] = {"num_block": 2}
    with pytest.raises(ConfigError, match="num_block"):
        HParams.from_dict(d)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"batch_size": 30, "m_per_class": 8}, "multiple of m_per_class"),
        ({"chunk_s": 99}, "chunk_s"),
        ({"mode": "sideways"}, "mode"),
        ({"early_stop_metric": "mAP"}, "map_stopping_testsets"),
        ({"learning_rate": "fast"}, "learning_rate must be float"),
        ({"cqt": {"hop_size": 0.02}}, "hop_size"),
        ({"input_dim": 84}, "input_dim"),
        ({"map_stopping_testsets": ["nope"]}, "not a configured test set"),
    ],
)
def test_impossible_values_are_clear_errors(change, message):
    d = _base()
    d.update(change)
    with pytest.raises(ConfigError, match=message):
        HParams.from_dict(d)


def test_focal_head_auto_is_resolved_from_the_number_of_works():
    d = _base()
    d["foc"]["output_dims"] = "auto"
    hp = HParams.from_dict(d)
    assert hp.model_config(37).num_classes == 37
    with pytest.raises(ConfigError, match="auto"):
        hp.model_config()


def test_round_trip_through_yaml(tmp_path):
    d = _base()
    d["covers"] = {"query_path": "q.txt", "ref_path": "r.txt", "every_n_epoch_to_test": 2}
    d["spec_augmentation"] = {"roll_pitch": {"prob": 0.5, "shift_num": 6, "method": "low_melody"}}
    hp = HParams.from_dict(d)
    save_hparams(hp, tmp_path / "hp.yaml")
    hp2 = load_hparams(tmp_path / "hp.yaml")
    assert hp2.to_dict() == hp.to_dict()
    assert hp2.testsets["covers"].every_n_epoch_to_test == 2
    assert hp2.spec_augmentation.roll_pitch.method == "low_melody"


def test_updated_deep_merges_and_revalidates():
    hp = HParams.from_dict(_base())
    hp2 = hp.updated({"encoder": {"num_blocks": 2}, "learning_rate": 0.01})
    assert hp2.model.num_blocks == 2 and hp2.learning_rate == 0.01
    assert hp2.model.output_dims == hp.model.output_dims
    with pytest.raises(ConfigError):
        hp.updated({"batch_size": 7})


def test_prep_config_keys_and_errors(tmp_path):
    p = tmp_path / "hparams.yaml"
    p.write_text(yaml.safe_dump({"fmin": 32, "n_bins": 84, "aug_speed_mode": [0.9, 1.0, 1.1],
                                 "val_data_split": 0.1, "cqt_flavour": "coverhunter"}))
    cfg = load_prep_config(p)
    assert cfg.features.n_bins == 84 and cfg.features.flavour == "coverhunter"
    assert cfg.aug_speed_mode == [0.9, 1.0, 1.1]
    assert PrepConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    with pytest.raises(ConfigError, match="val_data_spilt"):
        PrepConfig.from_dict({"val_data_spilt": 0.1})
    with pytest.raises(ConfigError, match="add_noise"):
        PrepConfig.from_dict({"add_noise": {"prob": 0.5}})
    assert load_prep_config(tmp_path / "missing.yaml") == PrepConfig()


def test_original_coverhunter_keys_load_and_round_trip():
    d = _base()
    d["ce"] = d.pop("foc")
    d.update({"data_type": "cqt", "num_gpus": 1, "pool_type": "attention", "cqt": {"hop_size": 0.04},
              "every_n_epoch_to_dev": 2, "chunk_frame": 250, "chunk_s": 30,
              "covers80": {"query_path": "q.txt", "every_n_epoch_to_dev": 3}})
    hp = HParams.from_dict(d)
    assert hp.every_n_epoch_to_test == 2 and hp.chunk_frame == [250]
    ts = hp.testsets["covers80"]
    assert (ts.ref_path, ts.every_n_epoch_to_test) == ("q.txt", 3)
    assert HParams.from_dict(hp.to_dict()) == hp


def test_distance_rule_is_declared_with_its_choices():
    assert HParams().distance_rule == "mean"  # measured on the demo: as good as min, 33x faster
    assert HParams.from_dict({**_base(), "distance_rule": "min"}).distance_rule == "min"
    with pytest.raises(ConfigError, match="distance_rule must be one of min, mean"):
        HParams.from_dict({**_base(), "distance_rule": "max"})


@pytest.mark.parametrize(
    "change, message",
    [
        ({"spec_augmentation": {"roll_pitch": {"prob": 1.5}}}, r"spec_augmentation\.roll_pitch\.prob must be in \[0, 1\]"),
        ({"spec_augmentation": {"random_erase": {"probb": 0.5}}}, "random_erase.probb.*random_erase.prob"),
        ({"encoder": [2]}, "encoder must be a mapping"),
        ({"chunk_frame": []}, "chunk_frame must be a non-empty list"),
        ({"tempo_jitter": 1.0}, "tempo_jitter must be in \\[0, 1\\)"),
        ({"foc": {"output_dims": 0}}, "foc.output_dims must be >= 1"),
    ],
)
def test_nested_keys_are_named_dotted_in_errors(change, message):
    d = _base()
    d.update(change)
    with pytest.raises(ConfigError, match=message):
        HParams.from_dict(d, where="runs/x/config/hparams.yaml")
