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
_MINIMUM = "minimum"


def _param(default: Any, allowed: tuple[str, ...] | None = None, minimum: int = 1) -> Any:
    return field(metadata={_DEFAULT: default, _ALLOWED: allowed, _MINIMUM: minimum})


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
    # How rows become sequences (harness/worker/batching.py): none (each row its own sequence,
    # padded), naive (rows concatenated and cut at max_seq_length; attention crosses rows) or
    # padding_free (a micro-batch's rows concatenated into one sequence, position ids restarting
    # and attention kept within each row). true and false, from older sweep files: see LEGACY.
    packing: str = _param("none", allowed=("none", "naive", "padding_free"))
    # The order rows meet in micro-batches: random (shuffled each epoch), or length_grouped (shuffled,
    # then sorted by length within groups of 50 micro-batches, so a micro-batch holds rows of similar length).
    batching: str = _param("random", allowed=("random", "length_grouped"))
    # > 0: a micro-batch holds as many rows (or packed sequences) as fit this many computed tokens
    # (rows x the longest, or their sum when padding-free) instead of batch_size of them.
    max_tokens_per_batch: int = _param(0, minimum=0)

    def __post_init__(self) -> None:
        for name, mapping in LEGACY.items():
            value = getattr(self, name)
            if isinstance(value, bool):
                object.__setattr__(self, name, mapping[value])


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
# The smallest whole number an integer hyperparameter takes (1 unless a field says otherwise).
MINIMUM: dict[str, int] = {f.name: f.metadata[_MINIMUM] for f in dataclasses.fields(TrainParams) if f.name in INTEGER}
# Values older sweep files (and studies stored by them) used, and what they mean now: ``packing``
# was a boolean, plain packing or none. Optuna keeps such a dimension as written, so a study
# begun with ``{choices: [false, true]}`` resumes unchanged; :func:`typed` reads its values in today's words.
LEGACY: dict[str, dict[bool, str]] = {"packing": {True: "naive", False: "none"}}
# Hyperparameters that mean something only for ``method: lora``; a full fine-tuning trial ignores them.
LORA_ONLY: tuple[str, ...] = ("lora_r", "lora_alpha", "lora_dropout")


def applicable(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with those the trial ignores set to None (what W&B and the report show): the
    LoRA-only ones for ``method: full``, ``batch_size`` when ``max_tokens_per_batch`` sizes micro-batches."""
    out = dict(params)
    if out.get("method") == "full":
        out.update({k: None for k in LORA_ONLY if k in out})
    if out.get("max_tokens_per_batch") and "batch_size" in out:
        out["batch_size"] = None
    return out


def _typed(name: str, value: Any) -> Any:
    if name in LEGACY and isinstance(value, bool):
        return LEGACY[name][value]
    return TYPES[name](value)


def typed(params: dict[str, Any]) -> dict[str, Any]:
    """Values as their hyperparameter's type (Optuna stores categorical numbers as they came,
    ranges as floats; ``LEGACY`` values in today's words); names outside the table pass through unchanged."""
    return {k: _typed(k, v) if k in TYPES else v for k, v in params.items()}
