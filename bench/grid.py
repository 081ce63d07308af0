"""A recorded benchmark of learning curves: every config of a grid, several seeds each, every
validation milestone, as one Parquet table that ``harness replay`` runs search strategies against
(as HPO research does with LCBench or YAHPO Gym: a strategy replayed hundreds of times in seconds
of CPU instead of GPU-hours).

    python bench/grid.py run bench/grid.yaml [--out bench/grid/NAME.parquet] [--results-dir results]
    python bench/grid.py export results/<study> --out FILE.parquet [--storage URL]
    python bench/grid.py merge A.parquet B.parquet ... --out FILE.parquet

``run`` reads a grid file (a sweep file whose searched dimensions are all ``{choices: [...]}``:
the grid's axes; ``seeds: K`` the seeds per config), turns it into a study of the harness whose
trials are every config of the grid, queued (``enqueue``) with no pruning, each trained once per
seed by the harness's own driver and workers, then exports it. Running the same command again
resumes the study (``n_trials`` is the grid's size): a GPU call with a time limit can record it in
pieces. ``method: full`` configs ignore the LoRA-only axes (``lora_r`` ...), so the grid holds one
full config per point of the other axes, not one per rank.

The table (one row per config x seed x milestone):

- ``config``: the config's name; ``param_<name>``: each axis (empty where the method ignores it);
- ``seed``, ``milestone_index`` (0, 1, ...), ``milestone`` (in the budget's unit, as the pruner
  sees it), ``budget_unit``, ``tokens`` (non-padding tokens trained so far), ``val_loss``;
- ``seconds``: training and validation so far in this seed's run; ``tokens_per_s`` (so far,
  after the timing warm-up); ``peak_mem_mib`` (the trial's: the card's reserved memory, RSS on CPU);
- ``devices`` (GPUs of the trial, the CPU counts one), ``gpu_seconds`` = ``seconds`` x ``devices``,
  ``fixed_gpu_s``: the trial's fixed cost before its first step (spawn, import, model load) x
  ``devices``, paid once per run: what a replay charges a trial on top of its milestone's
  ``gpu_seconds``;
- ``val_loss_start`` (the base's loss before fine-tuning), ``card`` (GPU name, or ``cpu``),
  ``host``, ``software`` (JSON: python, torch, transformers, peft, trl, unsloth, optuna and the
  harness commit), ``study``, ``model``, ``dataset``, ``trial``.

``merge`` combines recordings of the same grid made on a shared machine: each run's times from the
recording where it was fastest (the losses must agree).

The sweep side reads it without torch: this script imports neither torch nor unsloth itself
(versions come from the installed packages' metadata).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SOFTWARE = ("torch", "transformers", "peft", "trl", "unsloth", "optuna", "polars")


def grid_configs(cfg) -> list[dict[str, Any]]:
    """Every config of the grid file's axes, LoRA-only axes dropped (set to their first value) for
    ``method: full`` and the duplicates that leaves removed, in a stable order."""
    from harness import params
    from harness.errors import SweepFileError
    from harness.sweep.config import Choices

    axes = cfg.search_space.searched()
    for name, dim in axes.items():
        if not isinstance(dim, Choices):
            raise SweepFileError(f"search_space.{name}: a grid axis is a list of recorded values, {{choices: [...]}}")
    names = list(axes)
    out: list[dict[str, Any]] = []
    for values in itertools.product(*(axes[n].choices for n in names)):
        config = dict(zip(names, values))
        if config.get("method", cfg.search_space.fixed().get("method")) == "full":
            config.update({k: axes[k].choices[0] for k in params.LORA_ONLY if k in axes})
        if config not in out:
            out.append(config)
    return out


def config_name(config: dict[str, Any], method: str) -> str:
    from harness import params

    shown = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(config.items())
             if k != "method" and not (method == "full" and k in params.LORA_ONLY)]
    return " ".join([method, *shown])


def software() -> dict[str, str | None]:
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"python": platform.python_version(), **{n: version(n) for n in SOFTWARE}, "harness_commit": commit}


def recording_sweep(cfg):
    """The study that records the grid: every config queued, no pruning, nothing sampled."""
    configs = grid_configs(cfg)
    return cfg.model_copy(update={
        "enqueue": configs, "n_trials": len(configs),
        "sampler": cfg.sampler.model_copy(update={"name": "random"}),
        "pruner": cfg.pruner.model_copy(update={"name": "none"}),
    })


def export(study_dir: Path, storage: str | None = None) -> "pl.DataFrame":
    """The recorded table from a finished recording study (its storage alone)."""
    import optuna
    import polars as pl

    from harness import params as hp
    from harness.sweep.storage import default_storage, make_storage

    info = json.loads((study_dir / "study.json").read_text())
    sweep = json.loads((study_dir / "sweep.json").read_text())
    study = optuna.load_study(study_name=info["study"], storage=make_storage(storage or default_storage(study_dir)))
    axes = [n for n, d in sweep["search_space"].items() if isinstance(d, dict) and "choices" in d]
    fixed = {n: d for n, d in sweep["search_space"].items() if not isinstance(d, dict)}
    soft = json.dumps(study.user_attrs.get("software") or software())
    rows: list[dict[str, Any]] = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        a = t.user_attrs
        if not a.get("seed_curves") or a.get("outcome") != "complete":
            continue  # an infeasible config (out of memory) has no curve to replay
        config = hp.typed({**fixed, **t.params})
        method = config.get("method", "lora")
        shown = hp.applicable(config)
        devices = int(a.get("world_size") or sweep.get("gpus_per_trial") or 1)
        for seed, points in zip(a.get("seeds") or [a.get("seed")], a["seed_curves"]):
            for i, p in enumerate(points):
                rows.append({
                    "config": config_name({k: config[k] for k in axes}, method),
                    **{f"param_{k}": shown.get(k) for k in axes},
                    "seed": seed, "milestone_index": i, "milestone": float(p["milestone"]),
                    "budget_unit": a.get("budget_unit"), "tokens": p.get("tokens"), "val_loss": p["val_loss"],
                    "seconds": p["seconds"], "tokens_per_s": p.get("tokens_per_s"),
                    "peak_mem_mib": a.get("peak_mem_mib"), "devices": devices,
                    "gpu_seconds": p["seconds"] * devices, "fixed_gpu_s": (a.get("fixed_s") or 0.0) * devices,
                    "val_loss_start": a.get("val_loss_start"), "card": a.get("gpu_name") or "cpu",
                    "host": a.get("host"), "software": soft, "study": info["study"],
                    "model": sweep["model"]["name"], "dataset": sweep["dataset"]["source"], "trial": t.number,
                })
    if not rows:
        raise SystemExit(f"{study_dir}: no complete trial with recorded curves to export")
    return pl.DataFrame(rows, infer_schema_length=None).sort("config", "seed", "milestone_index")


def merge(frames: list["pl.DataFrame"]) -> "pl.DataFrame":
    """Several recordings of one grid (on a shared machine, other jobs slow some runs): each
    config and seed's run from the recording where it took the least time, as a benchmark keeps
    the fastest of its repeats. Their losses must agree (the runs are deterministic on CPU);
    ``recordings`` says how many there were."""
    import polars as pl

    keys = ["config", "seed", "milestone_index"]
    base = frames[0].select(*keys, "val_loss")
    for i, other in enumerate(frames[1:], 1):
        joined = base.join(other.select(*keys, pl.col("val_loss").alias("other")), on=keys, how="full", coalesce=True)
        if joined.height != base.height or joined.filter((pl.col("val_loss") - pl.col("other")).abs() > 1e-4).height:
            raise SystemExit(f"recording {i + 1} is not the same grid (configs, seeds or losses differ)")
    runs = pl.concat([f.with_columns(recording=pl.lit(i)) for i, f in enumerate(frames)], how="diagonal_relaxed")
    cost = runs.group_by("config", "seed", "recording").agg(total=pl.col("gpu_seconds").max() + pl.col("fixed_gpu_s").first())
    fastest = cost.sort("total").group_by("config", "seed").first().select("config", "seed", "recording")
    return (runs.join(fastest, on=["config", "seed", "recording"]).drop("recording")
            .with_columns(recordings=pl.lit(len(frames))).sort(*keys))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="record the grid (resumable), then export it")
    r.add_argument("grid", help="grid file, e.g. bench/grid.yaml")
    r.add_argument("--out", help="Parquet file (default: bench/grid/<study>.parquet)")
    r.add_argument("--results-dir", default="results")
    r.add_argument("--gpus", help="GPU pool on this host, e.g. 0,1: one config at a time on each")
    e = sub.add_parser("export", help="write the table of a recording study")
    e.add_argument("study_dir")
    e.add_argument("--out", required=True)
    e.add_argument("--storage")
    m = sub.add_parser("merge", help="several recordings of one grid: each run from the one where it was fastest")
    m.add_argument("recordings", nargs="+")
    m.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    if args.command == "export":
        frame = export(Path(args.study_dir), args.storage)
    elif args.command == "merge":
        import polars as pl

        frame = merge([pl.read_parquet(f) for f in args.recordings])
    else:
        from rich.console import Console

        from harness.sweep.config import load_sweep
        from harness.sweep.driver import run_sweep

        grid_file = Path(args.grid).resolve()
        cfg = recording_sweep(load_sweep(grid_file))
        console = Console(soft_wrap=True)
        n_seeds = cfg.seeds
        console.print(f"grid {grid_file.name}: {cfg.n_trials} configs x {n_seeds} seeds = {cfg.n_trials * n_seeds} runs")
        gpus = [int(g) for g in args.gpus.split(",")] if args.gpus else None
        results = Path(args.results_dir)
        run_sweep(cfg, grid_file.parent, results, console, gpus=gpus)
        import optuna

        from harness.sweep.storage import default_storage, make_storage

        study_dir = (results / cfg.study).resolve()
        study = optuna.load_study(study_name=cfg.study, storage=make_storage(cfg.storage or default_storage(study_dir)))
        if "software" not in study.user_attrs:
            study.set_user_attr("software", software())
        frame = export(study_dir, cfg.storage)
        args.out = args.out or str(ROOT / "bench" / "grid" / f"{cfg.study}.parquet")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(out)
    configs, seeds = frame["config"].n_unique(), frame["seed"].n_unique()
    print(f"wrote {out}: {frame.height} rows, {configs} configs x {seeds} seeds, "
          f"{frame.group_by('config', 'seed').agg(__import__('polars').col('gpu_seconds').max())['gpu_seconds'].sum():,.0f} "
          f"device-seconds of training and validation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
