"""Sweep files: YAML in, a validated :class:`SweepConfig` out.

The file is read with ``yaml.safe_load`` (tags such as ``!!python/object`` are refused, nothing in
a sweep file is ever executed) and validated with pydantic models that forbid unknown keys. Every
error is one line naming the file and the key's dotted path.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, ValidationInfo, create_model,
                      field_validator, model_validator)

from harness import params
from harness.data.presets import PRESETS
from harness.data.spec import DataSpec
from harness.errors import SweepFileError

Scalar = Union[bool, int, float, str]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Choices(_Strict):
    """A categorical dimension: ``{choices: [2, 4, 8]}``."""

    choices: list[Scalar] = Field(min_length=1)


class Range(_Strict):
    """A numeric range: ``{low: 1e-4, high: 1e-2, log: true}``; ``step`` makes it discrete."""

    low: float
    high: float
    log: bool = False
    step: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> "Range":
        if self.low > self.high:
            raise ValueError(f"low ({self.low:g}) is greater than high ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0 (got low={self.low:g})")
        if self.step is not None and self.step <= 0:
            raise ValueError(f"step must be > 0 (got {self.step:g})")
        if self.log and self.step is not None:
            raise ValueError("a range cannot be both log and stepped")
        return self


def _dimension_kind(v: Any) -> str:
    if isinstance(v, Choices) or (isinstance(v, dict) and "choices" in v):
        return "Choices"
    if isinstance(v, (Range, dict)):
        return "Range"
    return "Value"


# Tagged so that an error reports the one shape the user meant, not every member of the union.
Dimension = Annotated[
    Union[Annotated[Choices, Tag("Choices")], Annotated[Range, Tag("Range")], Annotated[Scalar, Tag("Value")]],
    Discriminator(_dimension_kind),
]


class _SearchSpaceBase(_Strict):
    """What a trial varies. Each entry is a fixed value, ``{choices: [...]}`` or a range."""

    @field_validator("*")
    @classmethod
    def _typed(cls, dim: Any, info: ValidationInfo) -> Any:
        # A field validator, so that an error's location is the key itself (search_space.<name>).
        name = info.field_name
        values: list[Any] = (
            dim.choices if isinstance(dim, Choices)
            else [dim.low, dim.high] if isinstance(dim, Range) else [dim]
        )
        for v in values:
            if name in params.ALLOWED:
                if isinstance(v, bool) and name in params.LEGACY and not isinstance(dim, Range):
                    continue  # an older sweep file's value (params.LEGACY says what it means now)
                if not isinstance(v, str) or v not in params.ALLOWED[name] or isinstance(dim, Range):
                    legacy = name in params.LEGACY and " (or " + " / ".join(
                        f"{str(b).lower()}: {m}" for b, m in params.LEGACY[name].items()) + ")"
                    raise ValueError(f"expected one of {', '.join(params.ALLOWED[name])}{legacy or ''}, got {v!r}")
                continue
            if name in params.BOOLEAN:
                if not isinstance(v, bool) or isinstance(dim, Range):
                    raise ValueError(f"expected true or false, got {v!r}")
                continue
            if isinstance(v, (str, bool)):
                raise ValueError(f"expected a number, got {v!r}")
            if name in params.INTEGER and (float(v) != int(v) or v < params.MINIMUM[name]):
                kind = "a positive integer" if params.MINIMUM[name] == 1 else f"an integer >= {params.MINIMUM[name]}"
                raise ValueError(f"expected {kind}, got {v!r}")
            if name == "learning_rate" and v <= 0:
                raise ValueError(f"must be > 0, got {v!r}")
        return dim

    def searched(self) -> dict[str, Choices | Range]:
        """The dimensions that vary (fixed values are left out)."""
        return {n: d for n in type(self).model_fields if isinstance(d := getattr(self, n), (Choices, Range))}

    def fixed(self) -> dict[str, Any]:
        return {n: d for n in type(self).model_fields if not isinstance(d := getattr(self, n), (Choices, Range))}


def _default_dimension(value: Any) -> Any:
    if isinstance(value, dict):
        return Choices(**value) if "choices" in value else Range(**value)
    return value


# One field per hyperparameter of harness.params.TrainParams, in its order, with its default.
SearchSpace = create_model(
    "SearchSpace", __base__=_SearchSpaceBase,
    **{name: (Dimension, _default_dimension(default)) for name, default in params.DEFAULTS.items()},
)


class PretrainConfig(_Strict):
    """A pretrained preset's recipe, changed (``model.pretrain``): a base built with other numbers
    is another base, cached apart (its folder is named by its recipe)."""

    tokens: int | None = Field(default=None, gt=0)
    seq_len: int | None = Field(default=None, gt=1)
    batch_size: int | None = Field(default=None, gt=0)
    learning_rate: float | None = Field(default=None, gt=0)
    held_out: float | None = Field(default=None, gt=0, lt=1)  # share of the corpus's sequences kept out, for the held-out loss


class ModelConfig(_Strict):
    """``name``: ``tiny-mistral`` (embedded default), a preset such as ``mistral-7b-v0.3`` (random
    init, no download), a local folder, or a hub id (needs network)."""

    name: str = Field(min_length=1)
    pretrain: PretrainConfig | None = None  # a pretrained preset (tiny-mistral-base, ...): its recipe changed
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    load_in_4bit: bool = False
    gradient_checkpointing: Literal["unsloth", "true", "false"] | bool = "unsloth"
    target_modules: list[str] = Field(
        default=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], min_length=1
    )

    @model_validator(mode="after")
    def _pretrain_needs_a_pretrained_preset(self) -> "ModelConfig":
        if self.pretrain is not None and "pretrain" not in PRESETS.get(self.name, {}):
            raise ValueError(f"pretrain: only a preset pretrained here has a recipe to change "
                             f"({', '.join(n for n, s in PRESETS.items() if 'pretrain' in s)}), not {self.name}")
        return self


class ColumnMap(_Strict):
    """Which of your columns holds each field a format reads."""

    text: str = "text"
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    messages: str = "messages"


class DatasetConfig(_Strict):
    """``source``: ``shakespeare`` / ``shakespeare-scenes`` (embedded), a .csv, .jsonl, .parquet or
    .txt file, a ``datasets`` folder (``save_to_disk``), or a hub id (needs network)."""

    source: str = "shakespeare"
    format: Literal["text", "instruction", "chat"] = "text"
    columns: ColumnMap = ColumnMap()
    template: Literal["auto", "chatml", "mistral"] = "auto"
    train_on_responses_only: bool = False
    split: str = "train"
    validation: str | None = None
    validation_split: str | None = None
    val_fraction: float = Field(default=0.02, gt=0, lt=1)
    max_train_rows: int | None = Field(default=None, gt=0)
    max_val_rows: int | None = Field(default=None, gt=0)


class Budget(_Strict):
    """How much data each trial trains on, the same for every trial, so that trials are compared
    at equal data whatever their batch size. At most one of:

    - ``tokens``: non-padding training tokens (the default kind);
    - ``examples``: training rows (naive packing: its sequences);
    - ``epochs``: passes over the training split, counted in its tokens;
    - ``max_steps``: optimizer steps, an explicit choice: a step of a larger batch holds more
      data, so a step budget favours large batches (the summary says so).

    With none given, one epoch. A trial also stops after ``search_space.epochs`` passes.
    ``eval_every`` is in the budget's unit (default: a fifth of the budget): every trial is
    validated, and reports to the pruner, at the same data milestones, and at the budget's end
    (a cadence longer than the budget means: at the end only).
    """

    tokens: int | None = Field(default=None, gt=0)
    examples: int | None = Field(default=None, gt=0)
    epochs: float | None = Field(default=None, gt=0)
    max_steps: int | None = Field(default=None, gt=0)
    eval_every: float | None = Field(default=None, gt=0)
    timing_warmup_steps: int = Field(default=2, ge=0)
    hang_timeout_s: float | None = Field(default=900, gt=0)  # no progress for this long: killed, marked failed

    @model_validator(mode="after")
    def _one_kind(self) -> "Budget":
        given = [k for k in ("tokens", "examples", "epochs", "max_steps") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one budget, not {' and '.join(given)}")
        return self

    def unit(self) -> str:
        """tokens, examples, epochs or steps."""
        if self.max_steps is not None:
            return "steps"
        return next((k for k in ("tokens", "examples") if getattr(self, k) is not None), "epochs")

    def amount(self) -> float:
        return {"tokens": self.tokens, "examples": self.examples, "steps": self.max_steps}.get(
            self.unit(), self.epochs if self.epochs is not None else 1.0)

    def describe(self) -> str:
        cadence = f", validated every {self.eval_every:,g}" if self.eval_every else ", validated 5 times"
        return f"{self.amount():,g} {self.unit()} per trial{cadence}"


# Each objective's natural direction, used when the sweep file gives none.
DIRECTIONS = {"val_loss": "minimize", "time_to_target": "minimize", "tokens_per_s": "maximize",
              "peak_mem_mib": "minimize"}


class Objective(_Strict):
    """``val_loss`` (the last validation loss), or ``time_to_target``: the training tokens (or
    seconds, evaluation included) a trial needs to reach validation loss ``target``, MLPerf
    style; a trial that does not reach it within the budget is recorded as not converged, with
    its best loss, and is never the best. In a list of ``objectives`` also ``tokens_per_s`` and
    ``peak_mem_mib``, as measured by the trial. ``direction`` defaults to the metric's natural one
    (``DIRECTIONS``)."""

    metric: Literal["val_loss", "time_to_target", "tokens_per_s", "peak_mem_mib"] = "val_loss"
    direction: Literal["minimize", "maximize"] | None = None
    target: float | None = None
    measure: Literal["tokens", "seconds"] = "tokens"

    @model_validator(mode="before")
    @classmethod
    def _natural_direction(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("direction") is None and data.get("metric", "val_loss") in DIRECTIONS:
            data = {**data, "direction": DIRECTIONS[data.get("metric", "val_loss")]}
        return data

    @model_validator(mode="after")
    def _target(self) -> "Objective":
        if self.metric == "time_to_target":
            if self.target is None:
                raise ValueError("time_to_target needs target: the validation loss to reach")
            if self.direction != "minimize":
                raise ValueError("time_to_target is minimized")
        elif self.target is not None:
            raise ValueError("target goes with metric: time_to_target")
        return self


class SamplerConfig(_Strict):
    """``tpe`` | ``random`` | ``grid`` | ``gp`` (Optuna's GPSampler: a Gaussian process; it imports
    torch into the driver, so it is for a host that has it) | ``cmaes`` (Optuna's CmaEsSampler: the
    ``cmaes`` package; single-objective; categorical dimensions are drawn at random beside it)."""

    name: Literal["tpe", "random", "grid", "gp", "cmaes"] = "tpe"
    n_startup_trials: int = Field(default=3, ge=0)


class PrunerConfig(_Strict):
    """``median`` | ``hyperband`` (Optuna's) | ``dominance`` (the harness's, sweep/pruning.py: stop a
    trial whose loss, even improved by the most any complete trial gained from the same milestone to
    its end, would still be worse than the best complete trial's final loss) | ``none``."""

    name: Literal["median", "hyperband", "dominance", "none"] = "median"
    n_startup_trials: int = Field(default=1, ge=0)
    n_warmup_steps: int = Field(default=0, ge=0)


class WarmStart(_Strict):
    """Run the best ``top`` configs of an earlier study first (queued before the sampler proposes
    any, as ``enqueue`` is). ``study``: its results folder (``results/<study>``, read through its
    study.json) or a storage URL; ``name``: the study's name in that storage when it holds several."""

    study: str = Field(min_length=1)
    top: int = Field(default=3, ge=1)
    name: str | None = None


class FaultTolerance(_Strict):
    """The driver beats a heartbeat on the storage for its running trial. A RUNNING trial whose
    heartbeat is older than ``grace_s`` (its driver died) is failed and retried, at most
    ``max_retries`` times."""

    heartbeat_s: float = Field(default=5, gt=0)
    grace_s: float = Field(default=30, gt=0)
    max_retries: int = Field(default=2, ge=0)

    @model_validator(mode="after")
    def _grace(self) -> "FaultTolerance":
        if self.grace_s <= self.heartbeat_s:
            raise ValueError(f"grace_s ({self.grace_s:g}) must exceed heartbeat_s ({self.heartbeat_s:g})")
        return self


class WandbConfig(_Strict):
    """``mode: auto`` is online when the user has W&B credentials, offline otherwise."""

    project: str = "harness"
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"


class SweepConfig(_Strict):
    study: str = Field(min_length=1)
    seed: int = 0
    seeds: int = Field(default=1, ge=1)  # > 1: each config trains once per seed; the objective is their mean
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: fork where no NVIDIA GPU is visible, warm where one is (see harness/launch/__init__.py)
    start_method: Literal["auto", "fork", "warm"] = "auto"
    # warm: a worker runs at most this many trials before a fresh one replaces it
    worker_max_trials: int = Field(default=50, ge=1)
    gpus_per_trial: int = Field(default=1, ge=1)  # > 1: a warm group under torchrun, a process per GPU (Gloo on CPU)
    # > 1: a warm worker trains up to this many LoRA trials at once on its one base, each on its own
    # rows of one combined batch (harness/worker/pack.py)
    concurrent_trials: int = Field(default=1, ge=1)
    model: ModelConfig
    dataset: DatasetConfig = DatasetConfig()
    max_seq_length: int = Field(default=256, gt=1)
    budget: Budget = Budget()
    search_space: SearchSpace = SearchSpace()  # type: ignore[valid-type]
    objective: Objective = Objective()
    # Several objectives at once (a multi-objective study: the Pareto front is the answer). One
    # entry is the same as ``objective``. ``prefer`` names the objective that picks ``best/`` from
    # the front (the front's best trial by that metric); default: the first.
    objectives: list[Objective] | None = None
    prefer: str | None = None
    sampler: SamplerConfig = SamplerConfig()
    pruner: PrunerConfig = PrunerConfig()
    n_trials: int = Field(default=8, gt=0)
    # Configs to try first, before the sampler proposes any (Optuna's enqueue_trial): a baseline the
    # study should beat, or a known-good config. Each names searched dimensions only; those it
    # leaves out are sampled. Queued once, when the study is created; they count towards n_trials.
    enqueue: list[dict[str, Scalar]] = []
    warm_start: WarmStart | None = None  # an earlier study's best configs first (sweep/warm_start.py)
    # Stop starting trials once the GPU-seconds spent (finished trials' wall time x gpus_per_trial)
    # plus the running trials' predicted rest and the next trial's predicted cost would pass this
    # many GPU-hours (sweep/gpu_budget.py). On CPU, the same with the CPU as the device.
    budget_gpu_hours: float | None = Field(default=None, gt=0)
    timeout: float | None = Field(default=None, gt=0)
    memory_budget_mib: float | None = Field(default=None, gt=0)  # over it: the trial is infeasible
    # Skip a config whose predicted peak memory is over the budget or the card (sweep/predict.py):
    # auto on GPU hosts, on, or off (the prediction is recorded either way).
    predicted_oom: Literal["auto", "on", "off"] = "auto"
    # The safety margin of that skip: predicted x (1 + margin) over the limit (bench/predictor/report.md
    # says what it costs: configs that fit within the margin are skipped too).
    predicted_oom_margin: float = Field(default=0.05, ge=0.0, lt=1.0)
    fault_tolerance: FaultTolerance = FaultTolerance()
    storage: str | None = None
    wandb: WandbConfig = WandbConfig()

    @field_validator("study")
    @classmethod
    def _study_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v):
            raise ValueError("use letters, digits, '.', '_' and '-' (it names a folder)")
        return v

    @field_validator("start_method", mode="before")
    @classmethod
    def _removed_start_methods(cls, v: Any) -> Any:
        if v in ("standby", "spawn"):
            raise ValueError(f"'{v}' was removed: warm keeps the GPU busier (bench/RESULTS.md, issue 15); use warm, "
                             "fork or auto")
        return v

    @field_validator("storage")
    @classmethod
    def _storage_url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^((sqlite|postgresql|postgresql\+\w+|mysql|mysql\+\w+)://|journal:.)", v):
            raise ValueError("expected sqlite:///path.db, postgresql://user@host/db or journal:///shared/path.log")
        return v

    @model_validator(mode="before")
    @classmethod
    def _loss_objective(cls, data: Any) -> Any:
        # With a list of objectives, ``objective`` is its loss entry (what pruning and time to
        # target read), so the rest of the code reads one place either way.
        if isinstance(data, dict) and isinstance(data.get("objectives"), list):
            entries = [o.model_dump() if isinstance(o, Objective) else o for o in data["objectives"]]
            losses = [o for o in entries if isinstance(o, dict) and o.get("metric", "val_loss") in ("val_loss", "time_to_target")]
            if not losses:
                return data
            derived = Objective.model_validate(losses[0]).model_dump()
            given = data.get("objective")
            if given is not None:  # a dumped config carries both: fine when they agree
                given = given.model_dump() if isinstance(given, Objective) else Objective.model_validate(given).model_dump()
                if given != derived:
                    raise ValueError("give objective or objectives, not both")
            data = {**data, "objective": derived}
        return data

    @model_validator(mode="after")
    def _concurrent_trials(self) -> "SweepConfig":
        """What trials that share a base's forward pass can be: LoRA adapters on one GPU, one seed,
        padded (or naively packed) micro-batches, in a warm worker."""
        if self.concurrent_trials == 1:
            return self
        space = self.search_space

        def values(name: str) -> list:
            dim = space.searched().get(name)
            return list(dim.choices) if isinstance(dim, Choices) else [space.fixed().get(name)]

        why = ("start_method: fork (each trial a fork of its own)" if self.start_method == "fork" else
               f"gpus_per_trial: {self.gpus_per_trial}" if self.gpus_per_trial > 1 else
               f"seeds: {self.seeds}" if self.seeds > 1 else
               "method: full (it trains the base itself)" if "full" in values("method") else
               "packing: padding_free" if "padding_free" in values("packing") else None)
        if why:
            raise ValueError(f"concurrent_trials: {self.concurrent_trials} needs warm workers training LoRA trials of "
                             f"one seed on one GPU each; this sweep has {why}")
        return self

    @model_validator(mode="after")
    def _objectives(self) -> "SweepConfig":
        if self.objectives is not None:
            if not self.objectives:
                raise ValueError("objectives: give at least one")
            metrics = [o.metric for o in self.objectives]
            if len(set(metrics)) != len(metrics):
                raise ValueError("objectives: each metric at most once")
            if "val_loss" not in metrics and "time_to_target" not in metrics:
                raise ValueError("objectives: include val_loss or time_to_target (pruning and the report follow the loss)")
            if "val_loss" in metrics and "time_to_target" in metrics:
                raise ValueError("objectives: val_loss or time_to_target, not both")
        if self.prefer is not None and self.prefer not in [o.metric for o in self.all_objectives()]:
            raise ValueError(f"prefer: {self.prefer!r} is not one of the objectives")
        if self.objective.metric not in ("val_loss", "time_to_target"):
            raise ValueError("objective: val_loss or time_to_target (speed and memory go in a list of objectives)")
        return self

    def all_objectives(self) -> list[Objective]:
        """Every objective, in the order of the study's values."""
        return list(self.objectives) if self.objectives else [self.objective]

    @property
    def multi_objective(self) -> bool:
        return len(self.all_objectives()) > 1

    def preferred_index(self) -> int:
        """Which of the study's values picks ``best/`` from the Pareto front."""
        metrics = [o.metric for o in self.all_objectives()]
        return metrics.index(self.prefer) if self.prefer else 0

    def data_spec(self) -> DataSpec:
        """What data preparation needs of this sweep file (harness.data takes nothing else)."""
        ds, space = self.dataset, self.search_space
        dim, packing = space.batch_size, space.packing
        largest = int(max(dim.choices) if isinstance(dim, Choices) else dim.high if isinstance(dim, Range) else dim)
        packings = [params.typed({"packing": v})["packing"]
                    for v in (packing.choices if isinstance(packing, Choices) else [packing])]
        return DataSpec(
            source=ds.source, format=ds.format, columns=ds.columns.model_dump(), template=ds.template,
            train_on_responses_only=ds.train_on_responses_only, split=ds.split, validation=ds.validation,
            validation_split=ds.validation_split, val_fraction=ds.val_fraction, max_train_rows=ds.max_train_rows,
            max_val_rows=ds.max_val_rows, max_seq_length=self.max_seq_length, seed=self.seed,
            largest_batch_size=largest, naive_packing="naive" in packings,
        )

    @model_validator(mode="after")
    def _token_cap_fits_a_row(self) -> "SweepConfig":
        dim = self.search_space.max_tokens_per_batch
        values = dim.choices if isinstance(dim, Choices) else [dim.low] if isinstance(dim, Range) else [dim]
        for v in values:
            if 0 < v < self.max_seq_length:
                raise ValueError(f"search_space.max_tokens_per_batch: {v:g} is below max_seq_length "
                                 f"({self.max_seq_length}), so a row of that length would fit no micro-batch "
                                 "(0 turns the cap off)")
        return self

    @model_validator(mode="after")
    def _enqueued_in_space(self) -> "SweepConfig":
        searched, fixed = self.search_space.searched(), self.search_space.fixed()
        if len(self.enqueue) > self.n_trials:
            raise ValueError(f"enqueue: {len(self.enqueue)} configs, more than n_trials ({self.n_trials})")
        for i, config in enumerate(self.enqueue):
            for name, value in config.items():
                where = f"enqueue.{i}.{name}"
                if name in fixed:
                    raise ValueError(f"{where}: search_space fixes it at {fixed[name]!r}; enqueue names searched "
                                     "dimensions only")
                if name not in searched:
                    raise ValueError(f"{where}: not a search_space dimension")
                dim = searched[name]
                if isinstance(dim, Choices):
                    if value not in dim.choices or type(value) is bool and not any(c is value for c in dim.choices):
                        raise ValueError(f"{where}: {value!r} is not one of the choices {dim.choices}")
                elif isinstance(value, (str, bool)) or not dim.low <= value <= dim.high:
                    raise ValueError(f"{where}: {value!r} is outside the range [{dim.low:g}, {dim.high:g}]")
                elif dim.step is not None and abs((value - dim.low) / dim.step - round((value - dim.low) / dim.step)) > 1e-9:
                    raise ValueError(f"{where}: {value!r} is not on the range's step {dim.step:g} from {dim.low:g}")
        return self

    @model_validator(mode="after")
    def _sampler_fits(self) -> "SweepConfig":
        if self.sampler.name == "cmaes" and self.multi_objective:
            raise ValueError("sampler.name: cmaes is single-objective; use tpe, gp or random with several objectives")
        return self

    @model_validator(mode="after")
    def _grid_needs_finite(self) -> "SweepConfig":
        if self.sampler.name == "grid":
            for name, dim in self.search_space.searched().items():
                if isinstance(dim, Range) and dim.step is None:
                    raise ValueError(f"search_space.{name}: the grid sampler needs choices or a range with step")
        return self


def _dotted(loc: tuple[Any, ...]) -> str:
    # pydantic puts union member names into the location ("Choices", "float", ...); users never
    # wrote those, so keep only the keys and list indices of their file.
    parts = [str(p) for p in loc if isinstance(p, int) or not (p[:1].isupper() or p in {"float", "int", "str", "bool"})]
    return ".".join(parts) or "(top level)"


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    msg = first["msg"].removeprefix("Value error, ")
    loc = first["loc"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    if not loc and re.match(r"[a-z_]+(\.[a-z_]+)*: ", msg):
        return msg  # a check across keys that names its key itself
    return f"{_dotted(loc)}: {msg}"


def parse_sweep(data: Any, source: str = "<sweep>") -> SweepConfig:
    """Validate an already-loaded mapping."""
    if not isinstance(data, dict):
        raise SweepFileError(f"{source}: expected a mapping of keys at the top level")
    try:
        return SweepConfig.model_validate(data)
    except ValidationError as err:
        raise SweepFileError(f"{source}: {_one_line(err)}") from None


def load_sweep(path: str | Path) -> SweepConfig:
    """Read and validate a sweep file. Raises :class:`SweepFileError` with one clear line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SweepFileError(f"{path}: sweep file not found") from None
    except UnicodeDecodeError as err:
        raise SweepFileError(f"{path}: not UTF-8 text (byte {err.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SweepFileError(f"{path}:{where}: not valid YAML or uses a tag that is not allowed ({problem})") from None
    return parse_sweep(data, str(path))
