"""The hyperparameters a trial varies: one table, read by the sweep file's schema, the Optuna
study (which ``suggest_*`` call and how a stored value is typed back) and the training loop.

Torch-free: the driver imports it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# The sweep file's default for each hyperparameter: a fixed value, or a search dimension written
# as the file would (``{"choices": [...]}`` or ``{"low": ..., "high": ..., "log": ...}``).
_DEFAULT = "default"


_ALLOWED = "allowed"


def _param(default: Any, allowed: tuple[str, ...] | None = None) -> Any:
    return field(metadata={_DEFAULT: default, _ALLOWED: allowed})


@dataclass(frozen=True)
class TrainParams:
    """One trial's hyperparameters. Field order and types are the single source of truth."""

    # lora: adapters on ``target_modules``, the base frozen; full: every weight trained, no adapters
    # (lora_r, lora_alpha and lora_dropout do not apply: see LORA_ONLY).
    method: str = _param("lora", allowed=("lora", "full"))
    batch_size: int = _param({"choices": [2, 4]})
    grad_accum: int = _param(1)
    learning_rate: float = _param({"low": 1e-4, "high": 1e-2, "log": True})
    lora_r: int = _param({"choices": [8, 16]})
    lora_alpha: int = _param(16)
    lora_dropout: float = _param(0.0)
    epochs: int = _param(1)
    weight_decay: float = _param(0.0)
    warmup_ratio: float = _param(0.05)
    packing: bool = _param(False)


NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrainParams))
# Types as Python types (the annotations are strings under ``from __future__ import annotations``).
TYPES: dict[str, type] = {f.name: {"int": int, "float": float, "bool": bool, "str": str}[f.type]
                          for f in dataclasses.fields(TrainParams)}
DEFAULTS: dict[str, Any] = {f.name: f.metadata[_DEFAULT] for f in dataclasses.fields(TrainParams)}
INTEGER = frozenset(n for n, t in TYPES.items() if t is int)
BOOLEAN = frozenset(n for n, t in TYPES.items() if t is bool)
# The values a string hyperparameter may take (the sweep file's schema refuses any other).
ALLOWED: dict[str, tuple[str, ...]] = {f.name: f.metadata[_ALLOWED] for f in dataclasses.fields(TrainParams)
                                       if f.metadata[_ALLOWED]}
# Hyperparameters that mean something only for ``method: lora``; a full fine-tuning trial ignores them.
LORA_ONLY: tuple[str, ...] = ("lora_r", "lora_alpha", "lora_dropout")


def applicable(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with those its method ignores set to None (what W&B and the report show)."""
    if params.get("method") != "full":
        return dict(params)
    return {k: None if k in LORA_ONLY else v for k, v in params.items()}


def typed(params: dict[str, Any]) -> dict[str, Any]:
    """Values as their hyperparameter's type (Optuna stores categorical numbers as they came,
    ranges as floats); names outside the table pass through unchanged."""
    return {k: TYPES[k](v) if k in TYPES else v for k, v in params.items()}
