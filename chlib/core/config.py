"""Typed, validated settings read once from YAML.

Two files carry settings, both in the original CoverHunter(MPS) key names so that configs move
both ways:

* ``datasets/<name>/hparams.yaml`` -> :class:`PrepConfig` (feature extraction, augmentation,
  splits), with the CQT settings in :class:`FeatureSettings`;
* ``runs/<name>/config/hparams.yaml`` -> :class:`HParams` (model, losses, training, test sets).

Unknown keys and impossible values raise :class:`~chlib.core.errors.ConfigError` naming the file,
the key and what to do. Values a user would otherwise compute by hand (frames per second, chunk
seconds) are derived properties. Keys of the original that have no effect (``data_type``,
``num_gpus``, ``pool_type``, ``cqt.hop_size`` ...) are accepted and checked for consistency.
"""

from __future__ import annotations

import copy
import difflib
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from chlib.core.errors import ConfigError

__all__ = [
    "FeatureSettings",
    "PrepConfig",
    "ModelConfig",
    "RandomEraseConfig",
    "RollPitchConfig",
    "SpecAugConfig",
    "TestSetConfig",
    "HParams",
    "load_yaml",
    "load_prep_config",
    "load_hparams",
    "save_hparams",
]


# --------------------------------------------------------------------------------------------
# helpers


def load_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping; a missing file or a non-mapping is a ConfigError."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value, got {type(data).__name__}")
    return data


def _unknown(where: str, key: str, allowed: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, allowed, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(
        f"{where}: unknown key {key!r}.{hint} Allowed keys: {', '.join(sorted(allowed))}."
    )


def _check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: {msg}")


def _as(value: Any, typ: type, where: str, key: str) -> Any:
    """Coerce YAML scalars to ``typ`` (int -> float allowed), else a ConfigError."""
    if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if typ is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if typ is bool and isinstance(value, bool):
        return value
    if typ is str and isinstance(value, str):
        return value
    raise ConfigError(f"{where}: {key} must be {typ.__name__}, got {value!r}")


# --------------------------------------------------------------------------------------------
# features


@dataclass(frozen=True)
class FeatureSettings:
    """How CQT features are computed. Part of every feature cache key and model fingerprint."""

    sample_rate: int = 16000  # Hz; audio is resampled to this before the CQT
    hop_length: int = 640  # samples between frames (640 at 16 kHz = 40 ms = 25 frames/s)
    fmin: float = 32.0  # Hz, centre of the lowest bin (the original's 32, not C1 = 32.70)
    n_bins: int = 96  # 8 octaves
    bins_per_octave: int = 12
    flavour: str = "nnaudio"  # "nnaudio" (CoverHunterMPS) or "coverhunter" (original PyCqt)

    @property
    def frames_per_second(self) -> float:
        """CQT frames per second of audio (25.0 by default)."""
        return self.sample_rate / self.hop_length

    @property
    def fmax(self) -> float:
        """Centre frequency of the top bin in Hz."""
        return self.fmin * 2 ** ((self.n_bins - 1) / self.bins_per_octave)

    def key(self) -> dict:
        """Plain dict used in cache keys and fingerprints."""
        return asdict(self)

    def validate(self, where: str = "features") -> FeatureSettings:
        _check(self.flavour in ("nnaudio", "coverhunter"), where,
               f"cqt_flavour must be 'nnaudio' or 'coverhunter', got {self.flavour!r}")
        _check(self.sample_rate > 0 and self.hop_length > 0, where, "sample_rate and hop_length must be > 0")
        _check(self.n_bins > 0 and self.bins_per_octave > 0 and self.fmin > 0, where,
               "n_bins, bins_per_octave and fmin must be > 0")
        _check(self.fmax < self.sample_rate / 2, where,
               f"top CQT bin {self.fmax:.0f} Hz is above Nyquist ({self.sample_rate / 2:.0f} Hz): "
               "lower n_bins or fmin, or raise sample_rate")
        return self


_FEATURE_KEYS = {  # yaml key -> FeatureSettings field
    "sample_rate": "sample_rate",
    "hop_length": "hop_length",
    "fmin": "fmin",
    "n_bins": "n_bins",
    "bins_per_octave": "bins_per_octave",
    "cqt_flavour": "flavour",
}


def _features_from(d: dict, where: str) -> FeatureSettings:
    kw: dict[str, Any] = {}
    types = {f.name: f.type for f in fields(FeatureSettings)}
    pytypes = {"int": int, "float": float, "str": str}
    for yk, fk in _FEATURE_KEYS.items():
        if yk in d:
            kw[fk] = _as(d[yk], pytypes[types[fk]], where, yk)
    return FeatureSettings(**kw).validate(where)


# --------------------------------------------------------------------------------------------
# data preparation


@dataclass
class PrepConfig:
    """Settings of ``datasets/<name>/hparams.yaml`` (the original's data-prep keys + chlib's)."""

    features: FeatureSettings = field(default_factory=FeatureSettings)
    aug_speed_mode: list[float] = field(default_factory=lambda: [1.0])  # tempo factors, 1.0 = original
    tempo_backend: str = "auto"  # "auto" | "sox" | "librosa" | "pedalboard"
    device: str = "auto"  # device for the CQT
    val_data_split: float = 0.0  # fraction of each seen work's recordings -> val
    val_unseen: float = 0.0  # fraction of works held out entirely for val
    test_data_split: float = 0.0  # fraction of each seen work's recordings -> test
    test_data_unseen: float = 0.0  # fraction of works held out entirely for test
    seed: int = 1234  # split and augmentation seed
    num_workers: int = 2  # parallel decoding processes
    batch_size: int = 16  # tracks per CQT batch

    @classmethod
    def from_dict(cls, d: dict, where: str = "prep config") -> PrepConfig:
        d = dict(d)
        allowed = list(_FEATURE_KEYS) + [f.name for f in fields(cls) if f.name != "features"] + [
            "add_noise"
        ]
        for k in d:
            if k not in allowed:
                raise _unknown(where, k, allowed)
        if "add_noise" in d:
            raise ConfigError(
                f"{where}: add_noise is not supported (the original's noise list was never "
                "shipped and its stage replaced the clean data); remove the key"
            )
        out = cls(features=_features_from(d, where))
        for k in ("val_data_split", "val_unseen", "test_data_split", "test_data_unseen"):
            if k in d:
                v = _as(d[k], float, where, k)
                _check(0.0 <= v < 1.0, where, f"{k} must be in [0, 1), got {v}")
                setattr(out, k, v)
        if "aug_speed_mode" in d:
            v = d["aug_speed_mode"]
            _check(isinstance(v, list) and len(v) > 0, where, "aug_speed_mode must be a non-empty list")
            v = [_as(x, float, where, "aug_speed_mode") for x in v]
            _check(all(0.25 <= x <= 4.0 for x in v), where, "aug_speed_mode factors must be in [0.25, 4]")
            out.aug_speed_mode = v
        for k, t in (("tempo_backend", str), ("device", str), ("seed", int), ("num_workers", int),
                     ("batch_size", int)):
            if k in d:
                setattr(out, k, _as(d[k], t, where, k))
        _check(out.tempo_backend in ("auto", "sox", "librosa", "pedalboard"), where,
               f"tempo_backend must be auto, sox, librosa or pedalboard, got {out.tempo_backend!r}")
        _check(out.num_workers >= 0 and out.batch_size >= 1, where, "num_workers >= 0, batch_size >= 1")
        _check(out.val_data_split + out.test_data_split < 1.0, where,
               "val_data_split + test_data_split must be < 1")
        return out

    def to_dict(self) -> dict:
        d = {yk: getattr(self.features, fk) for yk, fk in _FEATURE_KEYS.items()}
        for f in fields(self):
            if f.name != "features":
                d[f.name] = copy.deepcopy(getattr(self, f.name))
        return d


def load_prep_config(path: str | os.PathLike) -> PrepConfig:
    """Load ``datasets/<name>/hparams.yaml``; a missing file gives the defaults."""
    path = Path(path)
    if not path.exists():
        return PrepConfig()
    return PrepConfig.from_dict(load_yaml(path), where=str(path))


# --------------------------------------------------------------------------------------------
# model


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and loss settings: everything the network and its losses need."""

    input_dim: int = 96  # CQT bins (= n_bins)
    embed_dim: int = 128  # size of the retrieval embedding
    output_dims: int = 128  # conformer width (encoder.output_dims)
    num_blocks: int = 6  # conformer blocks
    attention_dim: int = 256  # feed-forward hidden size (the original's name for it)
    num_heads: int = 4  # fixed at 4 in the original
    dropout: float = 0.1  # residual / feed-forward / positional dropout
    conv_kernel: int = 15  # depthwise conv kernel of the conformer conv module
    num_classes: int = 30000  # focal-head classes (foc.output_dims)
    foc_weight: float = 1.0
    foc_gamma: float = 2.0
    triplet_margin: float = 0.3
    triplet_weight: float = 0.1
    center_weight: float = 0.0

    def validate(self, where: str = "model") -> ModelConfig:
        _check(self.output_dims % self.num_heads == 0, where,
               f"encoder.output_dims ({self.output_dims}) must be divisible by {self.num_heads} heads")
        _check(self.num_blocks >= 1 and self.embed_dim >= 1 and self.num_classes >= 1, where,
               "num_blocks, embed_dim and foc.output_dims must be >= 1")
        _check(self.input_dim >= 7, where, "input_dim must be >= 7 (two stride-2 3x3 convs)")
        return self


# --------------------------------------------------------------------------------------------
# spectral augmentation and test sets


@dataclass(frozen=True)
class RandomEraseConfig:
    prob: float = 0.0
    erase_num: int = 4
    region_size: tuple[float, float] = (0.25, 0.1)  # (time fraction, frequency fraction)


@dataclass(frozen=True)
class RollPitchConfig:
    prob: float = 0.0
    shift_num: int = 12
    method: str = "default"  # "default" | "low_melody" | "flex_melody" | "random" (chlib)


@dataclass(frozen=True)
class SpecAugConfig:
    random_erase: RandomEraseConfig = field(default_factory=RandomEraseConfig)
    roll_pitch: RollPitchConfig = field(default_factory=RollPitchConfig)

    @property
    def enabled(self) -> bool:
        return self.random_erase.prob > 0 or self.roll_pitch.prob > 0


@dataclass(frozen=True)
class TestSetConfig:
    """A retrieval test set: a top-level mapping with ``query_path`` and ``ref_path``."""

    name: str
    query_path: str
    ref_path: str
    every_n_epoch_to_test: int = 1
    query_in_ref_path: str | None = None
    save_name: str | None = None


# --------------------------------------------------------------------------------------------
# training hparams

_TRAIN_SCALARS: dict[str, tuple[type, Any]] = {
    # key: (type, default). Defaults are the original code defaults unless noted.
    "train_path": (str, None),
    "val_path": (str, None),
    "test_path": (str, None),
    "early_stop_metric": (str, "val_loss"),  # "val_loss" | "mAP"
    "every_n_epoch_to_test": (int, 1),
    "every_n_epoch_to_save": (int, 1),
    "mode": (str, "random"),  # training crop start: "random" | "defined"
    "mean_size": (int, 3),  # average this many CQT frames into one model frame
    "m_per_class": (int, 8),
    "device": (str, "auto"),
    "seed": (int, 1234),
    "num_workers": (int, 1),
    "batch_size": (int, 32),
    "learning_rate": (float, 0.001),
    "optimizer": (str, "adamw"),  # "adamw" | "prodigy"
    "adam_b1": (float, 0.8),
    "adam_b2": (float, 0.99),
    "weight_decay": (float, 0.01),  # chlib: the original's implicit AdamW default, made explicit
    "prodigy_d_coef": (float, 1.0),
    "prodigy_safeguard_warmup": (bool, False),
    "lr_decay": (float, 0.9),
    "lr_decay_every": (int, 1000),  # chlib: decay interval, in lr_decay_unit
    "lr_decay_unit": (str, "steps"),  # chlib: "steps" (original) | "epochs"
    "min_lr": (float, 0.0001),
    "warmup": (bool, False),  # chlib makes these work: linear warm-up over warmup_steps
    "warmup_steps": (int, 0),
    "hold_steps": (int, 0),  # after warm-up, hold the LR this many steps before decaying
    "grad_clip": (float, 1.0),  # chlib: global-norm clip (the original's hard-wired 1.0)
    "early_stopping_patience": (int, 20),
    "max_epochs": (int, 100),
    "map_smoothing_alpha": (float, 0.3),
    "bootstrap": (int, 0),
    "amp": (str, "none"),  # chlib: "none" | "bf16" (CUDA autocast)
    "compile": (bool, False),  # chlib: torch.compile the model
    "deterministic": (bool, False),  # chlib: deterministic algorithms
    "log_every_steps": (int, 100),
    "eval_batch_size": (int, 64),
    "tempo_jitter": (float, 0.0),  # chlib: feature-domain tempo factor in [1 - j, 1 + j]; 0 = off
    # production (k-fold) training, section 10.2 of the fact sheet
    "k_folds": (int, 5),
    "fold_lr_decay": (float, 0.98),
    "final_lr_decay": (float, 0.98),
    "fold_hold_steps": (int, 0),
    "final_fold_position": (float, None),
    "final_early_stopping_patience": (int, 3),
    "lr_initial_fold2": (float, None),
}
# accepted for compatibility, no effect (checked where it matters)
_IGNORED_KEYS = {"data_type", "num_gpus", "pool_type"}


@dataclass
class HParams:
    """A training run's settings (``runs/<name>/config/hparams.yaml``), validated.

    Attribute names follow the YAML keys. ``model`` holds the architecture and loss block,
    ``features`` the CQT settings, ``spec_augmentation`` the augmentation block and ``testsets``
    every top-level mapping with ``query_path``/``ref_path``.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    features: FeatureSettings = field(default_factory=FeatureSettings)
    spec_augmentation: SpecAugConfig = field(default_factory=SpecAugConfig)
    testsets: dict[str, TestSetConfig] = field(default_factory=dict)
    chunk_frame: list[int] = field(default_factory=lambda: [1125, 900, 675])
    map_stopping_testsets: list[str] = field(default_factory=list)
    num_classes_auto: bool = False  # foc.output_dims: auto -> sized to the training works
    source: str = "<dict>"  # where it was read from (for messages)
    train_path: str | None = None
    val_path: str | None = None
    test_path: str | None = None
    early_stop_metric: str = "val_loss"
    every_n_epoch_to_test: int = 1
    every_n_epoch_to_save: int = 1
    mode: str = "random"
    mean_size: int = 3
    m_per_class: int = 8
    device: str = "auto"
    seed: int = 1234
    num_workers: int = 1
    batch_size: int = 32
    learning_rate: float = 0.001
    optimizer: str = "adamw"
    adam_b1: float = 0.8
    adam_b2: float = 0.99
    weight_decay: float = 0.01
    prodigy_d_coef: float = 1.0
    prodigy_safeguard_warmup: bool = False
    lr_decay: float = 0.9
    lr_decay_every: int = 1000
    lr_decay_unit: str = "steps"
    min_lr: float = 0.0001
    warmup: bool = False
    warmup_steps: int = 0
    hold_steps: int = 0
    grad_clip: float = 1.0
    early_stopping_patience: int = 20
    max_epochs: int = 100
    map_smoothing_alpha: float = 0.3
    bootstrap: int = 0
    amp: str = "none"
    compile: bool = False
    deterministic: bool = False
    log_every_steps: int = 100
    eval_batch_size: int = 64
    tempo_jitter: float = 0.0
    k_folds: int = 5
    fold_lr_decay: float = 0.98
    final_lr_decay: float = 0.98
    fold_hold_steps: int = 0
    final_fold_position: float | None = None
    final_early_stopping_patience: int = 3
    lr_initial_fold2: float | None = None

    # ---- derived values (never typed in by hand)
    @property
    def frames_per_second(self) -> float:
        """Raw CQT frames per second (25 by default)."""
        return self.features.frames_per_second

    @property
    def chunk_len(self) -> list[int]:
        """Raw CQT frames per training chunk, for each entry of chunk_frame."""
        return [c * self.mean_size for c in self.chunk_frame]

    @property
    def chunk_s(self) -> float:
        """Seconds of audio in the first (evaluation) chunk: chunk_frame[0] x mean_size / fps."""
        return self.chunk_frame[0] * self.mean_size / self.frames_per_second

    @property
    def chunk_seconds(self) -> list[float]:
        """Seconds of audio for each training chunk length."""
        return [c / self.frames_per_second for c in self.chunk_len]

    @property
    def works_per_batch(self) -> int:
        return self.batch_size // self.m_per_class

    def model_config(self, num_works: int | None = None) -> ModelConfig:
        """The model block, with ``foc.output_dims: auto`` resolved to ``num_works``."""
        if self.num_classes_auto:
            if num_works is None:
                raise ConfigError(
                    f"{self.source}: foc.output_dims is 'auto'; the number of training works "
                    "is needed to size the focal head"
                )
            return replace(self.model, num_classes=int(num_works))
        return self.model

    def resolve_path(self, p: str | None, root: str | os.PathLike | None = None) -> Path | None:
        """Paths in the YAML are relative to ``root`` (default: current directory)."""
        if p is None:
            return None
        pp = Path(p)
        return pp if pp.is_absolute() or root is None else Path(root) / pp

    # ---- loading
    @classmethod
    def from_dict(cls, d: dict, where: str = "<dict>") -> HParams:
        d = copy.deepcopy(d)
        hp = cls(source=where)
        model_kw: dict[str, Any] = {}

        if "ce" in d and "foc" in d:
            raise ConfigError(f"{where}: both 'ce' (original) and 'foc' (fork) given; keep one")
        if "ce" in d:  # the original's name of the focal-loss block
            d["foc"] = d.pop("ce")

        allowed_top = (
            list(_TRAIN_SCALARS)
            + list(_IGNORED_KEYS)
            + list(_FEATURE_KEYS)
            + ["chunk_frame", "chunk_s", "cqt", "spec_augmentation", "map_stopping_testsets",
               "input_dim", "embed_dim", "encoder", "foc", "triplet", "center", "testsets",
               "every_n_epoch_to_dev"]
        )
        for k, v in list(d.items()):
            if k in allowed_top:
                continue
            if isinstance(v, dict) and ("query_path" in v or "ref_path" in v):
                continue  # a test set
            raise _unknown(where, k, allowed_top + ["<testset name>: {query_path, ref_path}"])

        if "every_n_epoch_to_dev" in d:  # original name
            d.setdefault("every_n_epoch_to_test", d.pop("every_n_epoch_to_dev"))

        for k, (t, _default) in _TRAIN_SCALARS.items():
            if k in d and d[k] is not None:
                setattr(hp, k, _as(d[k], t, where, k))

        hp.features = _features_from(d, where)

        if "chunk_frame" in d:
            cf = d["chunk_frame"]
            if isinstance(cf, int):
                cf = [cf]
            _check(isinstance(cf, list) and len(cf) > 0, where, "chunk_frame must be a non-empty list of ints")
            hp.chunk_frame = [_as(x, int, where, "chunk_frame") for x in cf]
            _check(all(x >= 15 for x in hp.chunk_frame), where,
                   "chunk_frame entries must be >= 15 model frames (the conv subsampling needs 7)")
        if "map_stopping_testsets" in d and d["map_stopping_testsets"] is not None:
            v = d["map_stopping_testsets"]
            _check(isinstance(v, list), where, "map_stopping_testsets must be a list of test-set names")
            hp.map_stopping_testsets = [str(x) for x in v]

        # cqt.hop_size (seconds) and chunk_s are the original's hand-kept values: accept, verify.
        if "cqt" in d:
            c = d["cqt"] or {}
            _check(isinstance(c, dict) and set(c) <= {"hop_size"}, where, "cqt may only hold hop_size")
            if "hop_size" in c:
                hs = _as(c["hop_size"], float, where, "cqt.hop_size")
                _check(abs(hs - hp.features.hop_length / hp.features.sample_rate) < 1e-6, where,
                       f"cqt.hop_size {hs} s disagrees with hop_length/sample_rate = "
                       f"{hp.features.hop_length / hp.features.sample_rate} s; remove cqt.hop_size")
        if "chunk_s" in d and d["chunk_s"] is not None:
            cs = _as(d["chunk_s"], float, where, "chunk_s")
            _check(abs(cs - hp.chunk_s) < 1e-6, where,
                   f"chunk_s {cs} disagrees with chunk_frame[0] x mean_size / frames_per_second = "
                   f"{hp.chunk_s:g}; chunk_s is derived, remove it")
        if "data_type" in d:
            _check(d["data_type"] == "cqt", where, f"data_type must be 'cqt', got {d['data_type']!r}")

        # model block
        if "input_dim" in d:
            model_kw["input_dim"] = _as(d["input_dim"], int, where, "input_dim")
        else:
            model_kw["input_dim"] = hp.features.n_bins
        if "embed_dim" in d:
            model_kw["embed_dim"] = _as(d["embed_dim"], int, where, "embed_dim")
        enc = d.get("encoder") or {}
        _check(isinstance(enc, dict), where, "encoder must be a mapping")
        enc_keys = {"output_dims": "output_dims", "num_blocks": "num_blocks",
                    "attention_dim": "attention_dim", "num_heads": "num_heads",
                    "dropout": "dropout", "conv_kernel": "conv_kernel"}
        for k, v in enc.items():
            if k not in enc_keys:
                raise _unknown(f"{where} encoder", k, list(enc_keys))
            model_kw[enc_keys[k]] = _as(v, float if k == "dropout" else int, where, f"encoder.{k}")
        foc = d.get("foc") or {}
        for k in foc:
            if k not in ("output_dims", "weight", "gamma"):
                raise _unknown(f"{where} foc", k, ["output_dims", "weight", "gamma"])
        if "output_dims" in foc:
            if foc["output_dims"] == "auto":
                hp.num_classes_auto = True
            else:
                model_kw["num_classes"] = _as(foc["output_dims"], int, where, "foc.output_dims")
        if "weight" in foc:
            model_kw["foc_weight"] = _as(foc["weight"], float, where, "foc.weight")
        if "gamma" in foc:
            model_kw["foc_gamma"] = _as(foc["gamma"], float, where, "foc.gamma")
        tri = d.get("triplet") or {}
        for k in tri:
            if k not in ("margin", "weight"):
                raise _unknown(f"{where} triplet", k, ["margin", "weight"])
        if "margin" in tri:
            model_kw["triplet_margin"] = _as(tri["margin"], float, where, "triplet.margin")
        if "weight" in tri:
            model_kw["triplet_weight"] = _as(tri["weight"], float, where, "triplet.weight")
        cen = d.get("center") or {}
        for k in cen:
            if k != "weight":
                raise _unknown(f"{where} center", k, ["weight"])
        if "weight" in cen:
            model_kw["center_weight"] = _as(cen["weight"], float, where, "center.weight")
        hp.model = ModelConfig(**model_kw).validate(where)
        _check(hp.model.input_dim == hp.features.n_bins, where,
               f"input_dim ({hp.model.input_dim}) must equal n_bins ({hp.features.n_bins})")

        # spectral augmentation
        sa = d.get("spec_augmentation") or {}
        _check(isinstance(sa, dict), where, "spec_augmentation must be a mapping")
        for k in sa:
            if k not in ("random_erase", "roll_pitch"):
                raise _unknown(f"{where} spec_augmentation", k, ["random_erase", "roll_pitch"])
        re_d = sa.get("random_erase") or {}
        for k in re_d:
            if k not in ("prob", "erase_num", "region_size"):
                raise _unknown(f"{where} random_erase", k, ["prob", "erase_num", "region_size"])
        re_kw: dict[str, Any] = {}
        if "prob" in re_d:
            re_kw["prob"] = _as(re_d["prob"], float, where, "random_erase.prob")
        if "erase_num" in re_d:
            re_kw["erase_num"] = _as(re_d["erase_num"], int, where, "random_erase.erase_num")
        if "region_size" in re_d:
            rs = re_d["region_size"]
            _check(isinstance(rs, (list, tuple)) and len(rs) == 2, where,
                   "random_erase.region_size must be [time_fraction, freq_fraction]")
            re_kw["region_size"] = tuple(_as(x, float, where, "region_size") for x in rs)
        rp_d = sa.get("roll_pitch") or {}
        for k in rp_d:
            if k not in ("prob", "shift_num", "method"):
                raise _unknown(f"{where} roll_pitch", k, ["prob", "shift_num", "method"])
        rp_kw: dict[str, Any] = {}
        if "prob" in rp_d:
            rp_kw["prob"] = _as(rp_d["prob"], float, where, "roll_pitch.prob")
        if "shift_num" in rp_d:
            rp_kw["shift_num"] = _as(rp_d["shift_num"], int, where, "roll_pitch.shift_num")
        if "method" in rp_d:
            rp_kw["method"] = _as(rp_d["method"], str, where, "roll_pitch.method")
            _check(rp_kw["method"] in ("default", "low_melody", "flex_melody", "random"), where,
                   "roll_pitch.method must be default, low_melody, flex_melody or random")
        hp.spec_augmentation = SpecAugConfig(RandomEraseConfig(**re_kw), RollPitchConfig(**rp_kw))
        for p in (hp.spec_augmentation.random_erase.prob, hp.spec_augmentation.roll_pitch.prob):
            _check(0.0 <= p <= 1.0, where, "augmentation probabilities must be in [0, 1]")

        # test sets: a `testsets:` mapping and/or top-level mappings (the original's layout)
        ts_items = dict(d.get("testsets") or {})
        for k, v in d.items():
            if isinstance(v, dict) and ("query_path" in v or "ref_path" in v) and k not in allowed_top:
                ts_items[k] = v
        for name, v in ts_items.items():
            allowed_ts = ["query_path", "ref_path", "every_n_epoch_to_test", "every_n_epoch_to_dev",
                          "query_in_ref_path", "save_name"]
            for k in v:
                if k not in allowed_ts:
                    raise _unknown(f"{where} test set {name!r}", k, allowed_ts)
            _check("query_path" in v, where, f"test set {name!r} needs query_path")
            every = v.get("every_n_epoch_to_test", v.get("every_n_epoch_to_dev", 1))
            hp.testsets[name] = TestSetConfig(
                name=name,
                query_path=str(v["query_path"]),
                ref_path=str(v.get("ref_path", v["query_path"])),
                every_n_epoch_to_test=_as(every, int, where, f"{name}.every_n_epoch_to_test"),
                query_in_ref_path=v.get("query_in_ref_path"),
                save_name=v.get("save_name"),
            )
        hp.validate()
        return hp

    def validate(self) -> HParams:
        w = self.source
        _check(self.batch_size >= 1 and self.m_per_class >= 1, w, "batch_size and m_per_class must be >= 1")
        _check(self.batch_size % self.m_per_class == 0, w,
               f"batch_size ({self.batch_size}) must be a multiple of m_per_class ({self.m_per_class})")
        _check(self.mean_size >= 1, w, "mean_size must be >= 1")
        _check(self.mode in ("random", "defined"), w, f"mode must be random or defined, got {self.mode!r}")
        _check(self.early_stop_metric in ("val_loss", "mAP"), w,
               f"early_stop_metric must be val_loss or mAP, got {self.early_stop_metric!r}")
        _check(self.optimizer in ("adamw", "prodigy"), w, f"optimizer must be adamw or prodigy, got {self.optimizer!r}")
        _check(self.lr_decay_unit in ("steps", "epochs"), w, "lr_decay_unit must be steps or epochs")
        _check(self.amp in ("none", "bf16"), w, f"amp must be none or bf16, got {self.amp!r}")
        _check(0 < self.lr_decay <= 1.0, w, f"lr_decay must be in (0, 1], got {self.lr_decay}")
        _check(self.learning_rate > 0 and self.min_lr >= 0, w, "learning_rate must be > 0, min_lr >= 0")
        _check(self.lr_decay_every >= 1, w, "lr_decay_every must be >= 1")
        _check(self.max_epochs >= 1, w, "max_epochs must be >= 1")
        _check(self.every_n_epoch_to_test >= 1 and self.every_n_epoch_to_save >= 1, w,
               "every_n_epoch_to_test and every_n_epoch_to_save must be >= 1")
        _check(0 < self.map_smoothing_alpha <= 1, w, "map_smoothing_alpha must be in (0, 1]")
        for name in self.map_stopping_testsets:
            _check(name in self.testsets, w,
                   f"map_stopping_testsets names {name!r}, which is not a configured test set "
                   f"({', '.join(self.testsets) or 'none configured'})")
        if self.early_stop_metric == "mAP":
            _check(bool(self.map_stopping_testsets), w,
                   "early_stop_metric: mAP needs map_stopping_testsets naming configured test sets")
        _check(self.k_folds >= 2, w, "k_folds must be >= 2")
        _check(0.0 <= self.tempo_jitter < 1.0, w,
               f"tempo_jitter must be in [0, 1) (0.1 = tempo factors 0.9..1.1), got {self.tempo_jitter}")
        return self

    def to_dict(self) -> dict:
        """The YAML mapping (original key names) that reloads to an equal object."""
        d: dict[str, Any] = {}
        for k in _TRAIN_SCALARS:
            v = getattr(self, k)
            if v is not None:
                d[k] = v
        for yk, fk in _FEATURE_KEYS.items():
            d[yk] = getattr(self.features, fk)
        d["chunk_frame"] = list(self.chunk_frame)
        if self.map_stopping_testsets:
            d["map_stopping_testsets"] = list(self.map_stopping_testsets)
        m = self.model
        d["input_dim"] = m.input_dim
        d["embed_dim"] = m.embed_dim
        d["encoder"] = {"output_dims": m.output_dims, "num_blocks": m.num_blocks,
                        "attention_dim": m.attention_dim, "num_heads": m.num_heads,
                        "dropout": m.dropout, "conv_kernel": m.conv_kernel}
        d["foc"] = {"output_dims": "auto" if self.num_classes_auto else m.num_classes,
                    "weight": m.foc_weight, "gamma": m.foc_gamma}
        d["triplet"] = {"margin": m.triplet_margin, "weight": m.triplet_weight}
        d["center"] = {"weight": m.center_weight}
        sa = self.spec_augmentation
        d["spec_augmentation"] = {
            "random_erase": {"prob": sa.random_erase.prob, "erase_num": sa.random_erase.erase_num,
                             "region_size": list(sa.random_erase.region_size)},
            "roll_pitch": {"prob": sa.roll_pitch.prob, "shift_num": sa.roll_pitch.shift_num,
                           "method": sa.roll_pitch.method},
        }
        for name, ts in self.testsets.items():
            t = {"query_path": ts.query_path, "ref_path": ts.ref_path,
                 "every_n_epoch_to_test": ts.every_n_epoch_to_test}
            if ts.query_in_ref_path:
                t["query_in_ref_path"] = ts.query_in_ref_path
            if ts.save_name:
                t["save_name"] = ts.save_name
            d[name] = t
        return d

    def updated(self, overrides: dict) -> HParams:
        """A new validated HParams with ``overrides`` deep-merged into this one's YAML dict."""
        return HParams.from_dict(deep_merge(self.to_dict(), overrides), where=self.source)


def deep_merge(base: dict, over: dict) -> dict:
    """Recursively merge ``over`` into a copy of ``base`` (mappings merge, the rest replaces)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_hparams(path: str | os.PathLike) -> HParams:
    """Load and validate a training config (``runs/<name>/config/hparams.yaml``)."""
    return HParams.from_dict(load_yaml(path), where=str(path))


def save_hparams(hp: HParams, path: str | os.PathLike) -> None:
    """Write ``hp`` as YAML atomically."""
    from chlib.core.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(hp.to_dict(), sort_keys=False, allow_unicode=True))
