"""Typed, validated settings read once from YAML, in the original CoverHunter(MPS) key names:
``datasets/<name>/hparams.yaml`` -> :class:`PrepConfig`, ``runs/<name>/config/hparams.yaml`` ->
:class:`HParams`. The original's keys without effect (``data_type``, ``num_gpus``, ``pool_type``,
``cqt.hop_size``, ``chunk_s``) are accepted and checked for consistency."""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import yaml

from chlib.core import schema
from chlib.core.errors import ConfigError
from chlib.core.io import atomic_write_text
from chlib.core.schema import check, deep_merge, load_yaml, opt

__all__ = ["FeatureSettings", "PrepConfig", "ModelConfig", "RandomEraseConfig", "RollPitchConfig",
           "SpecAugConfig", "TestSetConfig", "HParams", "load_yaml", "load_prep_config",
           "load_hparams", "save_hparams", "deep_merge", "INPUT_TRANSFORM_BINS", "KEYED_TRANSFORMS",
           "input_bins"]

# bins of the model input per ``input_transform`` (None: the CQT's own); the transforms
# themselves are chlib.data.features.INPUT_TRANSFORMS
INPUT_TRANSFORM_BINS: dict[str, int | None] = {"none": None, "keyed_chroma": 12}
KEYED_TRANSFORMS = ("keyed_chroma",)  # transforms that estimate a key (and take a key_shift)


def input_bins(n_bins: int, transform: str = "none") -> int:
    """Bins of the model input (its ``input_dim``) for ``n_bins`` CQT bins under ``transform``."""
    if transform not in INPUT_TRANSFORM_BINS:
        raise ConfigError(f"input_transform must be one of {', '.join(INPUT_TRANSFORM_BINS)}, "
                          f"got {transform!r}")
    return INPUT_TRANSFORM_BINS[transform] or int(n_bins)

# ranges used below (a list field's range applies to each entry)
_POSITIVE, _AT_LEAST_1, _FRACTION, _PROB = "(0, inf)", "[1, inf)", "[0, 1)", "[0, 1]"
_AT_LEAST_0, _DECAY, _SEED = "[0, inf)", "(0, 1]", "[0, 4294967295]"  # numpy seeds: 32 bits
_ODD = (lambda v: v >= 1 and v % 2 == 1, "an odd number >= 1")


@dataclass(frozen=True)
class FeatureSettings:
    """How CQT features are computed. Part of every feature cache key and model fingerprint."""

    sample_rate: int = opt(16000, rng=_POSITIVE)  # Hz; audio is resampled to this before the CQT
    hop_length: int = opt(640, rng=_POSITIVE)  # samples between frames (640 at 16 kHz = 40 ms)
    fmin: float = opt(32.0, rng=_POSITIVE)  # Hz, lowest bin centre (the original's 32, not C1)
    n_bins: int = opt(96, rng=_POSITIVE)  # 8 octaves
    bins_per_octave: int = opt(12, rng=_POSITIVE)
    # "nnaudio" (CoverHunterMPS) or "coverhunter" (the original's PyCqt)
    flavour: str = opt("nnaudio", key="cqt_flavour", choices=("nnaudio", "coverhunter"))

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
        schema.check_fields(self, where)
        check(self.fmax < self.sample_rate / 2, where,
               f"top CQT bin {self.fmax:.0f} Hz is above Nyquist ({self.sample_rate / 2:.0f} Hz): "
               "lower n_bins or fmin, or raise sample_rate")
        return self


@dataclass
class PrepConfig:
    """Settings of ``datasets/<name>/hparams.yaml`` (the original's data-prep keys + chlib's)."""

    features: FeatureSettings = opt(FeatureSettings, key="")
    aug_speed_mode: list[float] = opt([1.0], rng="[0.25, 4]", nonempty=True)  # tempo factors
    tempo_backend: str = opt("auto", choices=("auto", "sox", "librosa", "pedalboard"))
    device: str = opt("auto")  # device for the CQT
    val_data_split: float = opt(0.0, rng=_FRACTION)  # fraction of each seen work's recordings -> val
    val_unseen: float = opt(0.0, rng=_FRACTION)  # fraction of works held out entirely for val
    test_data_split: float = opt(0.0, rng=_FRACTION)  # ... of each seen work's recordings -> test
    test_data_unseen: float = opt(0.0, rng=_FRACTION)  # fraction of works held out for test
    seed: int = opt(1234, rng=_SEED)  # split and augmentation seed
    num_workers: int = opt(2, rng=_AT_LEAST_0)  # parallel decoding processes
    batch_size: int = opt(16, rng=_AT_LEAST_1)  # tracks per CQT batch

    @classmethod
    def from_dict(cls, d: dict, where: str = "prep config") -> PrepConfig:
        check("add_noise" not in d, where, "add_noise is not supported (the original's noise "
               "list was never shipped and its stage replaced the clean data); remove the key")
        flat = schema.flatten(d, where, allowed := schema.keys(cls))
        schema.reject_unknown(flat, allowed, where)
        return schema.build(cls, flat, where).validate(where)

    def validate(self, where: str = "prep config") -> PrepConfig:
        schema.check_fields(self, where)
        self.features.validate(where)
        check(self.val_data_split + self.test_data_split < 1.0, where,
               "val_data_split + test_data_split must be < 1")
        return self

    def to_dict(self) -> dict:
        return schema.dump(self, {})


def load_prep_config(path: str | os.PathLike) -> PrepConfig:
    """Load ``datasets/<name>/hparams.yaml``; a missing file gives the defaults."""
    return PrepConfig.from_dict(load_yaml(path), str(path)) if Path(path).exists() else PrepConfig()


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and loss settings: everything the network and its losses need."""

    # fixed: the shape of the network (a run's checkpoints hold exactly these)
    input_dim: int = opt(96, rng="[7, inf)", fixed=True,
                         hint="two stride-2 3x3 convs")  # CQT bins (= n_bins)
    embed_dim: int = opt(128, rng=_AT_LEAST_1, fixed=True)  # size of the retrieval embedding
    output_dims: int = opt(128, key="encoder.output_dims", rng=_AT_LEAST_1,
                           fixed=True)  # conformer width
    num_blocks: int = opt(6, key="encoder.num_blocks", rng=_AT_LEAST_1, fixed=True)
    attention_dim: int = opt(256, key="encoder.attention_dim", rng=_AT_LEAST_1,
                             fixed=True)  # feed-forward hidden size
    num_heads: int = opt(4, key="encoder.num_heads", rng=_AT_LEAST_1, fixed=True)  # original: 4
    dropout: float = opt(0.1, key="encoder.dropout", rng=_FRACTION)  # residual / ff / positional
    conv_kernel: int = opt(15, key="encoder.conv_kernel", valid=_ODD, fixed=True)  # depthwise
    num_classes: int = opt(30000, key="foc.output_dims", rng=_AT_LEAST_1,
                           fixed=True)  # focal-head classes
    foc_weight: float = opt(1.0, key="foc.weight", rng=_AT_LEAST_0)
    foc_gamma: float = opt(2.0, key="foc.gamma", rng=_AT_LEAST_0)
    triplet_margin: float = opt(0.3, key="triplet.margin", rng=_AT_LEAST_0)
    triplet_weight: float = opt(0.1, key="triplet.weight", rng=_AT_LEAST_0)
    center_weight: float = opt(0.0, key="center.weight", rng=_AT_LEAST_0)

    def validate(self, where: str = "model") -> ModelConfig:
        schema.check_fields(self, where)
        check(self.output_dims % self.num_heads == 0, where,
               f"encoder.output_dims ({self.output_dims}) must be divisible by {self.num_heads} heads")
        check(self.foc_weight + self.triplet_weight + self.center_weight > 0, where, "the loss "
              "weights foc.weight, triplet.weight and center.weight are all 0: nothing to learn "
              "from; set foc.weight: 1")
        return self


@dataclass(frozen=True)
class RandomEraseConfig:
    prob: float = opt(0.0, rng=_PROB)
    erase_num: int = opt(4, rng=_AT_LEAST_0)
    region_size: tuple[float, float] = opt((0.25, 0.1), rng="(0, 1]",
                                           hint="[time fraction, frequency fraction]")


@dataclass(frozen=True)
class RollPitchConfig:
    prob: float = opt(0.0, rng=_PROB)
    shift_num: int = opt(12, rng=_AT_LEAST_0)
    method: str = opt("default", choices=("default", "low_melody", "flex_melody", "random"))


@dataclass(frozen=True)
class SpecAugConfig:
    random_erase: RandomEraseConfig = opt(RandomEraseConfig)
    roll_pitch: RollPitchConfig = opt(RollPitchConfig)

    @property
    def enabled(self) -> bool:
        return self.random_erase.prob > 0 or self.roll_pitch.prob > 0


@dataclass(frozen=True)
class TestSetConfig:
    """A retrieval test set: a top-level mapping with ``query_path`` and ``ref_path``."""

    name: str = opt(key=None)
    query_path: str = opt()
    ref_path: str = opt()
    every_n_epoch_to_test: int = opt(1, rng=_AT_LEAST_1)
    query_in_ref_path: str | None = opt(None)
    save_name: str | None = opt(None)

    @classmethod
    def from_dict(cls, name: str, d: dict, where: str) -> TestSetConfig:
        where = f"{where} test set {name!r}"
        check(isinstance(d, dict), where, "must be a mapping with query_path and ref_path")
        d = dict(d)
        schema.rename(d, "every_n_epoch_to_dev", "every_n_epoch_to_test", where)
        schema.reject_unknown(d, schema.keys(cls), where)
        check("query_path" in d, where, "needs query_path")
        d.setdefault("ref_path", d["query_path"])
        return schema.build(cls, d, where, name=name)


_CHECKED_KEYS = ("chunk_s", "cqt.hop_size", "data_type", "num_gpus", "pool_type")  # no effect


@dataclass
class HParams:
    """A training run's settings (``runs/<name>/config/hparams.yaml``), named as the YAML keys;
    ``testsets``: every top-level mapping with ``query_path``/``ref_path`` (or a ``testsets:``
    block). Defaults are the original code's unless marked chlib."""

    train_path: str | None = opt(None)
    val_path: str | None = opt(None)
    test_path: str | None = opt(None)
    early_stop_metric: str = opt("val_loss", choices=("val_loss", "mAP"))
    distance_rule: str = opt("mean", choices=("min", "mean"))  # chlib: track distance of a run
    # chlib: key readings every window is embedded at (semitones added to a keyed transform's
    # estimate; the closer reading decides, chlib.retrieval.protocol)
    key_variants: list[int] = opt([0], rng="[0, 11]", nonempty=True,
                                  hint="[0, 7]: also a fifth up (the estimate's usual error)")
    # chlib: compare each recording together with its nearest reference (protocol docstring)
    neighbour_expansion: bool = opt(False)
    input_transform: str = opt("none", choices=tuple(INPUT_TRANSFORM_BINS),
                               fixed=True)  # chlib: model input
    every_n_epoch_to_test: int = opt(1, rng=_AT_LEAST_1)
    every_n_epoch_to_save: int = opt(1, rng=_AT_LEAST_1)
    mode: str = opt("random", choices=("random", "defined"))  # training crop start
    mean_size: int = opt(3, rng=_AT_LEAST_1, fixed=True)  # CQT frames averaged per model frame
    m_per_class: int = opt(8, rng=_AT_LEAST_1)
    device: str = opt("auto")
    seed: int = opt(1234, rng=_SEED)
    num_workers: int = opt(1, rng=_AT_LEAST_0)
    batch_size: int = opt(32, rng=_AT_LEAST_1)
    learning_rate: float = opt(0.001, rng=_POSITIVE)
    optimizer: str = opt("adamw", choices=("adamw", "prodigy"))
    adam_b1: float = opt(0.8, rng=_FRACTION)
    adam_b2: float = opt(0.99, rng=_FRACTION)
    weight_decay: float = opt(0.01, rng=_AT_LEAST_0)  # chlib: the original's implicit default
    prodigy_d_coef: float = opt(1.0, rng=_POSITIVE)
    prodigy_safeguard_warmup: bool = opt(False)
    lr_decay: float = opt(0.9, rng=_DECAY)
    lr_decay_every: int = opt(1000, rng=_AT_LEAST_1)  # chlib: decay interval, in lr_decay_unit
    lr_decay_unit: str = opt("steps", choices=("steps", "epochs"))  # chlib; original: steps
    min_lr: float = opt(0.0001, rng=_AT_LEAST_0)
    warmup: bool = opt(False)  # chlib makes these work: linear warm-up over warmup_steps
    warmup_steps: int = opt(0, rng=_AT_LEAST_0)
    hold_steps: int = opt(0, rng=_AT_LEAST_0)  # after warm-up, hold the LR this many steps
    grad_clip: float = opt(1.0, rng=_AT_LEAST_0)  # chlib: global-norm clip (0: off; original 1)
    early_stopping_patience: int = opt(20, rng=_AT_LEAST_1)
    max_epochs: int = opt(100, rng=_AT_LEAST_1)
    map_smoothing_alpha: float = opt(0.3, rng=_DECAY)
    bootstrap: int = opt(0, rng=_AT_LEAST_0)
    amp: str = opt("none", choices=("none", "bf16"))  # chlib: CUDA bf16 autocast
    compile: bool = opt(False)  # chlib: torch.compile the model
    deterministic: bool = opt(False)  # chlib: deterministic algorithms
    log_every_steps: int = opt(100, rng=_AT_LEAST_1)
    eval_batch_size: int = opt(64, rng=_AT_LEAST_1)
    # chlib: feature-domain tempo factors in [1 - j, 1 + j]; 0 = off
    tempo_jitter: float = opt(0.0, rng=_FRACTION, hint="0.1 = tempo factors 0.9..1.1")
    timbre_eq_db: float = opt(0.0, rng="[0, 40]", hint="random spectral envelopes up to this depth")
    # chlib: share of training crops given a random bass and chords in their estimated key
    accompaniment_prob: float = opt(0.0, rng=_PROB, hint="0.5 = half the crops get chords")
    # chlib: coarse-to-fine training: chunks of a work cut at one aligned passage (train.align)
    align_path: str | None = opt(None, hint="an alignments .json of chlib.train.align")
    # production (k-fold) training, section 10.2 of the fact sheet
    k_folds: int = opt(5, rng="[2, inf)")
    fold_lr_decay: float = opt(0.98, rng=_DECAY)
    final_lr_decay: float = opt(0.98, rng=_DECAY)
    fold_hold_steps: int = opt(0, rng=_AT_LEAST_0)
    final_fold_position: float | None = opt(None, rng="[1, inf)",
                                            hint="a fold number; default k_folds - 0.5")
    final_early_stopping_patience: int = opt(3, rng=_AT_LEAST_1)
    lr_initial_fold2: float | None = opt(None, rng=_POSITIVE)
    features: FeatureSettings = opt(FeatureSettings, key="", fixed=True)
    chunk_frame: list[int] = opt([1125, 900, 675], rng="[15, inf)", nonempty=True,
                                 hint="model frames; the conv subsampling needs 7")
    map_stopping_testsets: list[str] = opt([])
    model: ModelConfig = opt(ModelConfig, key="")
    spec_augmentation: SpecAugConfig = opt(SpecAugConfig)
    testsets: dict[str, TestSetConfig] = opt({}, key=None)
    num_classes_auto: bool = opt(False, key=None)  # foc.output_dims: auto -> one per work
    source: str = opt("<dict>", key=None)  # where it was read from (for messages)

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
        return self.chunk_seconds[0]

    @property
    def chunk_seconds(self) -> list[float]:
        """Seconds of audio for each training chunk length."""
        return [c / self.frames_per_second for c in self.chunk_len]

    @property
    def works_per_batch(self) -> int:
        return self.batch_size // self.m_per_class

    def model_config(self, num_works: int | None = None) -> ModelConfig:
        """The model block, with ``foc.output_dims: auto`` resolved to ``num_works``."""
        if not self.num_classes_auto:
            return self.model
        check(num_works is not None, self.source, "foc.output_dims is 'auto'; the number of "
               "training works is needed to size the focal head")
        return replace(self.model, num_classes=int(num_works))

    def resolve_path(self, p: str | None) -> Path | None:
        """A path from the YAML (relative to the current directory), or None."""
        return None if p is None else Path(p)

    @classmethod
    def from_dict(cls, d: dict, where: str = "<dict>") -> HParams:
        d = copy.deepcopy(d)
        schema.rename(d, "ce", "foc", where)  # the original's name of the focal-loss block
        allowed = schema.keys(cls) + ["every_n_epoch_to_dev", *_CHECKED_KEYS]
        tests = d.pop("testsets", None) or {}
        check(isinstance(tests, dict), where, "testsets must map names to {query_path, ref_path}")
        flat = schema.flatten(d, where, allowed)
        tests.update({k: flat.pop(k) for k, v in list(flat.items())  # the original's test sets
                      if k not in allowed and "." not in k and isinstance(v, dict)
                      and ("query_path" in v or "ref_path" in v)})
        schema.reject_unknown(flat, allowed, where, ", <test set name>: {query_path, ref_path}")
        schema.rename(flat, "every_n_epoch_to_dev", "every_n_epoch_to_test", where)
        if auto := flat.get("foc.output_dims") == "auto":
            del flat["foc.output_dims"]
        if isinstance(flat.get("chunk_frame"), int):
            flat["chunk_frame"] = [flat["chunk_frame"]]
        n_bins, transform = flat.get("n_bins"), flat.get("input_transform") or "none"
        if "input_dim" not in flat and (n_bins is not None or transform != "none"):
            flat["input_dim"] = input_bins(FeatureSettings.n_bins if n_bins is None else n_bins,
                                           transform)
        hp = schema.build(cls, flat, where, source=where, num_classes_auto=auto,
                    testsets={n: TestSetConfig.from_dict(n, v, where) for n, v in tests.items()})
        hp.validate()
        # the original's hand-kept cqt.hop_size (s), chunk_s and data_type
        check(flat.get("data_type") in (None, "cqt"), where,
              f"data_type must be 'cqt', got {flat.get('data_type')!r}")
        hop_s = hp.features.hop_length / hp.features.sample_rate
        for key, derived, rule in (("cqt.hop_size", hop_s, "hop_length / sample_rate"), (
                "chunk_s", hp.chunk_s, "chunk_frame[0] x mean_size / frames_per_second")):
            if flat.get(key) is not None:
                given = schema.coerce(flat[key], float, where, key)
                check(abs(given - derived) < 1e-6, where, f"{key} {given:g} s disagrees with "
                      f"{rule} = {derived:g} s; it is derived, remove {key}")
        return hp

    def validate(self) -> HParams:
        w = self.source
        schema.check_fields(self, w)
        self.features.validate(w)
        self.model.validate(w)
        bins = input_bins(self.features.n_bins, self.input_transform)
        check(self.model.input_dim == bins, w, f"input_dim ({self.model.input_dim}) must equal "
              f"the model input's bins ({bins}: n_bins {self.features.n_bins}, input_transform "
              f"{self.input_transform})")
        kv = self.key_variants
        check(kv[0] == 0 and len(set(kv)) == len(kv), w, f"key_variants must start with 0 (the "
              f"estimated key) and not repeat a shift, got {kv}")
        check(kv == [0] or self.input_transform in KEYED_TRANSFORMS, w,
              f"key_variants {kv} need a keyed input_transform ({', '.join(KEYED_TRANSFORMS)}), "
              f"got {self.input_transform!r}; use key_variants: [0] otherwise")
        check(self.batch_size % self.m_per_class == 0, w,
               f"batch_size ({self.batch_size}) must be a multiple of m_per_class ({self.m_per_class})")
        missing = [n for n in self.map_stopping_testsets if n not in self.testsets]
        check(not missing, w, f"map_stopping_testsets names {', '.join(map(repr, missing))}, not "
              f"a configured test set ({', '.join(self.testsets) or 'none configured'})")
        check(self.early_stop_metric != "mAP" or bool(self.map_stopping_testsets), w,
               "early_stop_metric: mAP needs map_stopping_testsets naming configured test sets")
        for ts in self.testsets.values():
            schema.check_fields(ts, f"{w} test set {ts.name!r}")
        return self

    def to_dict(self) -> dict:
        """The YAML mapping (original key names) that reloads to an equal object."""
        d = schema.dump(self, {})
        if self.num_classes_auto:
            d["foc"]["output_dims"] = "auto"
        return d | {name: schema.dump(ts, {}) for name, ts in self.testsets.items()}

    def updated(self, overrides: dict) -> HParams:
        """A new validated HParams with ``overrides`` deep-merged into this one's YAML dict."""
        return HParams.from_dict(deep_merge(self.to_dict(), overrides), where=self.source)


def load_hparams(path: str | os.PathLike) -> HParams:
    """Load and validate a training config (``runs/<name>/config/hparams.yaml``)."""
    return HParams.from_dict(load_yaml(path), where=str(path))


def save_hparams(hp: HParams, path: str | os.PathLike) -> None:
    """Write ``hp`` as YAML atomically."""
    atomic_write_text(path, yaml.safe_dump(hp.to_dict(), sort_keys=False, allow_unicode=True))
