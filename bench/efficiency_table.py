"""Helper of ``bench/gpu_efficiency.sh``: sweep efficiency by start method, from the Optuna storages
alone (no Polars: the GPU host has none).

    python3 bench/efficiency_table.py sweep SRC.yaml DST.yaml --study NAME --trials N --steps S \\
        --start-method M [--timeout SECONDS]     # a copy of a sweep file with those set
    python3 bench/efficiency_table.py prepare SWEEP.yaml   # build its model and tokenize its data (cached)
    python3 bench/efficiency_table.py run ARGS...          # harness.cli ARGS, Ctrl-C (SIGINT) honoured
    python3 bench/efficiency_table.py table RESULTS_DIR [--json FILE]   # the tables, from every study there

The figures are ``harness.sweep.efficiency``'s, the same the report shows in ``summary.md``.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
from pathlib import Path

import yaml


def make_sweep(args: argparse.Namespace) -> None:
    """The sweep file with its study, trials, step budget and start method replaced. Not validated
    here: a start method this version does not know fails in ``harness run`` with one line."""
    sweep = yaml.safe_load(Path(args.src).read_text())
    sweep.update(study=args.study, n_trials=args.trials, start_method=args.start_method)
    if args.timeout:
        sweep["timeout"] = args.timeout  # no new trial starts after it; the running one finishes
    budget = {k: v for k, v in (sweep.get("budget") or {}).items()
              if k not in ("tokens", "examples", "epochs", "max_steps", "eval_every")}
    # One validation at the end (plus the one before the first step): the steps are what is timed.
    sweep["budget"] = {**budget, "max_steps": args.steps, "eval_every": args.steps}
    Path(args.dst).write_text(yaml.safe_dump(sweep, sort_keys=False))


def prepare(args: argparse.Namespace) -> None:
    """What a study prepares once (the model built, the data tokenized), done ahead into the cache,
    so the first method measured does not pay for it alone."""
    from harness.launch import run_prepare
    from harness.sweep.config import load_sweep

    cfg = load_sweep(args.sweep)
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "sweep.json"
        config.write_text(json.dumps(cfg.model_dump(mode="json", exclude={"storage"})))
        run_prepare(config, Path(args.sweep).resolve().parent, Path(tmp) / "prepared.json", Path(tmp) / "prepare.log")
        print(json.loads((Path(tmp) / "prepared.json").read_text())["model_dir"])


def run(argv: list[str]) -> int:
    """``harness`` with SIGINT raising KeyboardInterrupt even where the shell started us with it
    ignored (a background job): ``timeout -s INT`` then ends the study as Ctrl-C does, and the
    driver still records its run."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from harness.cli import main

    return main(argv)


def _mean(values: list) -> float | None:
    values = [float(v) for v in values if v is not None]
    return statistics.fmean(values) if values else None


def study_rows(results: Path) -> list[dict]:
    """One entry per study folder under ``results``: its efficiency and its trials' figures."""
    import optuna

    from harness.sweep.efficiency import measure

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = []
    for db in sorted(results.glob("*/study.db")):
        name = json.loads((db.parent / "study.json").read_text())["study"]
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
        trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
        runs = study.user_attrs.get("sweep_runs", [])
        e = measure(study)
        sweep = json.loads((db.parent / "sweep.json").read_text()) if (db.parent / "sweep.json").exists() else {}
        attrs = ("outcome", "start_method", "steps", "fixed_s", "warmup_s", "steady_step_s", "train_steady_s",
                 "train_s", "eval_s", "spawn_s", "import_s", "load_s", "tokens_per_s", "peak_mem_mib", "val_loss",
                 "worker_trial", "base_reused", "resident_worker", "gpu_name")
        trained = [t for t in trials if t.user_attrs.get("reached_training")]
        method = ",".join(sorted({r.get("start_method") or "?" for r in runs})) or sweep.get("start_method")
        if any(r.get("resident_slots") for r in runs):
            method += " (resident)"  # slots borrowed workers `harness warm up` started before the run
        out.append({
            "study": name,
            "start_method": method,
            "steps": (sweep.get("budget") or {}).get("max_steps"),
            "n_trials": sweep.get("n_trials"),
            "runs": runs,
            "trials_trained": e.trials if e else 0,
            "sweep_efficiency": e.efficiency if e else None,
            "train_gpu_s": e.train_gpu_s if e else None,
            "wall_gpu_s": e.wall_gpu_s if e else None,
            "trials_per_hour": e.trials_per_hour if e else None,
            "fixed_s_mean": e.fixed_s if e else None, "fixed_s_first": e.first_fixed_s if e else None,
            "fixed_s_later": _mean([t.user_attrs.get("fixed_s") for t in trained[1:]]),
            "warmup_s_mean": e.warmup_s if e else None, "warmup_s_first": e.first_warmup_s if e else None,
            "steady_step_s_mean": _mean([t.user_attrs.get("steady_step_s") for t in trials]),
            "tokens_per_s_mean": _mean([t.user_attrs.get("tokens_per_s") for t in trials]),
            "trials": [{"number": t.number, "state": t.state.name,
                        "duration_s": t.duration.total_seconds() if t.duration else None,
                        **{k: t.user_attrs.get(k) for k in attrs}} for t in trials],
        })
    return out


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def markdown(rows: list[dict]) -> str:
    head = ["study", "start method", "steps", "trials trained", "sweep efficiency", "training GPU-s", "wall GPU-s",
            "fixed_s mean", "fixed_s first", "fixed_s later", "warmup_s mean", "warmup_s first", "steady step s",
            "tokens/s", "trials/hour"]
    keys = ["study", "start_method", "steps", None, "sweep_efficiency", "train_gpu_s", "wall_gpu_s", "fixed_s_mean",
            "fixed_s_first", "fixed_s_later", "warmup_s_mean", "warmup_s_first", "steady_step_s_mean",
            "tokens_per_s_mean", "trials_per_hour"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['trials_trained']} of {r['n_trials']}" if k is None else
                 f"{r[k]:.1%}" if k == "sweep_efficiency" and r[k] is not None else _cell(r[k]) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("sweep efficiency = Σ trials' steps × steady step time (× GPUs per trial) ÷ Σ runs' wall time × GPUs "
                 "(harness/sweep/efficiency.py); fixed_s: the driver starting a trial to its first step; warmup_s: "
                 "its first timing_warmup_steps beyond the steady pace. Mean over the trials that trained; first: "
                 "the study's first trial; later: the others. (resident): slots borrowed workers `harness warm up` "
                 "started before the run, so their import (and a load and compile an earlier study did) is not in "
                 "its wall time.")
    for r in rows:
        trial_keys = ["number", "state", "start_method", "resident_worker", "worker_trial", "steps", "fixed_s",
                      "spawn_s", "import_s", "load_s", "warmup_s", "steady_step_s", "train_steady_s", "eval_s",
                      "duration_s", "val_loss", "peak_mem_mib"]
        lines += ["", f"{r['study']}: " + "; ".join(
            f"run {i}: {run.get('wall_s')} s wall x {run.get('gpus')} GPU, {run.get('trials')} trials, "
            f"{run.get('start_method')}, {run.get('resident_slots') or 0} resident" for i, run in enumerate(r["runs"])), "",
                  "| " + " | ".join(trial_keys) + " |", "|" + "---|" * len(trial_keys)]
        lines += ["| " + " | ".join(_cell(t.get(k)) for k in trial_keys) + " |" for t in r["trials"]]
    return "\n".join(lines) + "\n"


def table(args: argparse.Namespace) -> None:
    rows = study_rows(Path(args.results))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(markdown(rows) if rows else f"no study under {args.results}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "run":
        return run(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sweep")
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--study", required=True)
    s.add_argument("--trials", type=int, required=True)
    s.add_argument("--steps", type=int, required=True)
    s.add_argument("--start-method", required=True)
    s.add_argument("--timeout", type=float)
    s.set_defaults(func=make_sweep)
    p = sub.add_parser("prepare")
    p.add_argument("sweep")
    p.set_defaults(func=prepare)
    t = sub.add_parser("table")
    t.add_argument("results")
    t.add_argument("--json")
    t.set_defaults(func=table)
    args = parser.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
