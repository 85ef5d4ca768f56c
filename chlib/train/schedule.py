"""The learning-rate schedule and the early-stopping rules of a training run."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from chlib.core.config import HParams

__all__ = ["lr_at", "EarlyStopping"]


def lr_at(step: int, epoch: int, hp: HParams) -> float:
    """Learning rate of optimizer update ``step`` (1-based), made in epoch ``epoch`` (0-based).

    Linear warm-up over ``warmup_steps`` (when ``hp.warmup``), ``learning_rate`` for
    ``hold_steps`` more, then ``max(min_lr, learning_rate x lr_decay ** n)`` with
    ``n = (step - warmup - hold) // lr_decay_every`` (``lr_decay_unit: steps``; the original:
    0.9 every 1000 steps) or ``n = epoch // lr_decay_every`` (``epochs``).
    """
    if step < 1:
        raise ValueError(f"step is 1-based, got {step}")
    base = hp.learning_rate
    warm = hp.warmup_steps if hp.warmup else 0
    if warm > 0 and step <= warm:
        return base * step / warm
    if step <= warm + hp.hold_steps:
        return base
    elapsed = step - warm - hp.hold_steps if hp.lr_decay_unit == "steps" else max(0, epoch)
    return max(hp.min_lr, base * hp.lr_decay ** (elapsed // hp.lr_decay_every))


@dataclass
class EarlyStopping:
    """Early-stopping bookkeeping (the fork's rules, coverhunter-facts 7.5).

    ``val_loss`` / ``train_loss``: an epoch strictly below the best becomes the best and resets
    the counter, else the counter grows. ``mAP``: the best *raw* mean mAP names the best epoch;
    the counter resets when the EMA-smoothed value (``alpha``; first value = raw) beats the best
    smoothed value, else it grows. The counter does not grow during warm-up/hold (``in_hold``).
    Stop when ``counter >= patience``. chlib: an epoch that ties the best raw mAP with a lower
    ``tie_loss`` (the validation loss) becomes the best (a small validation set reaches 1.0
    early and stays there; the fork keeps the first epoch that reached it).
    """

    metric: str = "val_loss"
    patience: int = 20
    alpha: float = 0.3
    best_validation_loss: float = math.inf
    best_raw_map: float = -math.inf
    best_smoothed_map: float = -math.inf
    smoothed_map: float | None = None
    early_stopping_counter: int = 0
    map_stopping_counter: int = 0
    best_checkpoint_epoch: int | None = None
    best_checkpoint_value: float | None = None
    best_tie_loss: float = math.inf  # the validation loss of the best mAP epoch

    @property
    def counter(self) -> int:
        return self.map_stopping_counter if self.metric == "mAP" else self.early_stopping_counter

    @property
    def should_stop(self) -> bool:
        return self.counter >= self.patience

    def update(self, epoch: int, value: float, *, in_hold: bool = False,
               tie_loss: float | None = None) -> bool:
        """Record ``value`` (a loss, or the mean mAP) of ``epoch`` (``tie_loss``: its validation
        loss, which breaks a tie of the mAP); True if it is the new best."""
        is_map = self.metric == "mAP"
        if not math.isfinite(value):
            improved = is_best = False
        elif is_map:
            self.smoothed_map = value if self.smoothed_map is None else (
                self.alpha * value + (1.0 - self.alpha) * self.smoothed_map)
            tie = tie_loss if tie_loss is not None and math.isfinite(tie_loss) else math.inf
            is_best = value > self.best_raw_map or (value == self.best_raw_map
                                                   and tie < self.best_tie_loss)
            if is_best:
                self.best_tie_loss = tie
            improved = self.smoothed_map > self.best_smoothed_map
            self.best_raw_map = max(self.best_raw_map, value)
            self.best_smoothed_map = max(self.best_smoothed_map, self.smoothed_map)
        else:
            is_best = improved = value < self.best_validation_loss
            self.best_validation_loss = min(self.best_validation_loss, value)
        if is_best:
            self.best_checkpoint_epoch, self.best_checkpoint_value = int(epoch), float(value)
        name = "map_stopping_counter" if is_map else "early_stopping_counter"
        if improved:
            setattr(self, name, 0)
        elif not in_hold:
            setattr(self, name, getattr(self, name) + 1)
        return is_best

    def state_dict(self) -> dict:
        """The fields a resume restores (all but the settings ``patience`` and ``alpha``)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("patience", "alpha")}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            if k != "metric" and hasattr(self, k):
                setattr(self, k, v)
        if "best_tie_loss" not in state and self.best_checkpoint_epoch is not None:
            self.best_tie_loss = -math.inf  # saved before ties were broken: keep its best
