"""``harness run SWEEP.yaml``, ``harness report DIR/<study>``, ``harness eval DIR/<study>``,
``harness warm up`` (resident warm workers) and the rest: ``harness --help``.

Errors a user can fix are printed as one line (``error: ...``) with exit code 2; no stack trace.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from harness.errors import HarnessError, TrialsCannotRun
from harness.files import write_json_atomic, write_text_atomic


def _cmd_run(args: argparse.Namespace, console: Console) -> int:
    from harness.sweep.config import load_sweep
    from harness.sweep.driver import run_sweep
    from harness.sweep.signals import Terminated, hard_exit

    cfg = load_sweep(args.sweep)
    updates = {}
    if args.n_trials is not None:
        if args.n_trials <= 0:
            raise HarnessError(f"--n-trials must be > 0 (got {args.n_trials})")
        updates["n_trials"] = args.n_trials
    if args.storage:
        updates["storage"] = args.storage
    if updates:
        cfg = type(cfg).model_validate({**cfg.model_dump(), **updates})
    joining = args.command in ("join", "worker")
    if joining and not cfg.storage:
        raise HarnessError("harness join joins a shared study: give --storage postgresql://... or journal:///shared/path.log "
                           "(or storage: in the sweep file)")
    gpus = None
    if args.gpus:
        try:
            gpus = [int(g) for g in args.gpus.split(",")]
        except ValueError:
            raise HarnessError(f"--gpus: expected GPU indices such as 0,1 (got {args.gpus})") from None
    study_dir = (Path(args.results_dir) / cfg.study).resolve()
    code = 0
    try:
        run_sweep(cfg, Path(args.sweep).resolve().parent, Path(args.results_dir), console, gpus=gpus, join=joining)
    except KeyboardInterrupt:
        console.print("interrupted: the running trial is marked interrupted (it runs again next time); "
                      "writing the tables")
        code = 130
    except TrialsCannotRun as err:
        console.print(f"[red]error:[/] {escape(str(err))}", highlight=False)
        code = 1
    except Terminated:
        # The scheduler's grace period is short (Slurm's KillWait: 30 s): no tables here; any
        # other driver's, or `harness report --storage`, makes them from the storage.
        console.print("terminated (SIGTERM): the running trials are marked interrupted and run again first, "
                      "on another driver or the next run; no tables written", highlight=False)
        # Everything is recorded and the workers are gone; W&B's exit hooks would only complain
        # that its service (signalled with the task) is gone, or hold the exit up.
        hard_exit()
    if importlib.util.find_spec("polars") is None:
        if line := _efficiency_line(cfg, study_dir):
            console.print(line, highlight=False)
        console.print(f"polars is not installed here: make the tables with `harness report {study_dir}`")
        return code
    from harness.sweep.report import FIGURES, build_report

    out = build_report(study_dir, cfg.storage, figures=args.figures)
    if out["headline"]:
        console.print(out["headline"])
    if out["efficiency"]:
        console.print(out["efficiency"], highlight=False)
    console.print("report: " + "  ".join(str(out[k]) for k in ("summary", "parquet", "plot", *FIGURES) if out[k]))
    return code


def _efficiency_line(cfg, study_dir: Path) -> str | None:
    """The study's sweep efficiency in one line, read from its storage without Polars."""
    import optuna

    from harness.sweep.efficiency import measure
    from harness.sweep.storage import default_storage, make_storage

    try:
        study = optuna.load_study(study_name=cfg.study, storage=make_storage(cfg.storage or default_storage(study_dir)))
    except (KeyError, HarnessError):  # nothing ran: no study yet
        return None
    measured = measure(study)
    return measured.line() if measured else None


def _cmd_report(args: argparse.Namespace, console: Console) -> int:
    from harness.sweep.report import FIGURES, build_report

    study_dir = Path(args.study_dir)
    if not study_dir.is_dir():
        raise HarnessError(f"{study_dir}: no such study folder (expected results/<study>)")
    try:
        out = build_report(study_dir, args.storage, figures=args.figures)
    except FileNotFoundError as err:
        raise HarnessError(str(err)) from None
    except KeyError as err:
        raise HarnessError(f"{study_dir}: {err.args[0]}") from None
    console.print(out["summary"].read_text())
    console.print("wrote " + ", ".join(str(out[k]) for k in ("summary", "parquet", "plot", *FIGURES) if out[k]))
    return 0


def _cmd_eval(args: argparse.Namespace, console: Console) -> int:
    from harness.worker.evaluate import weights_val_loss

    try:
        loss = weights_val_loss(Path(args.study_dir), args.weights and Path(args.weights))
    except FileNotFoundError as err:
        raise HarnessError(str(err)) from None
    print(f"val_loss {loss:.6f}")
    return 0


def _cmd_rerun(args: argparse.Namespace, console: Console) -> int:
    from harness.sweep.rerun import rerun

    result, report = rerun(Path(args.study_dir), args.top, args.seeds, console, args.storage)
    console.print(report.read_text(), markup=False, highlight=False)
    console.print(f"wrote {report}")
    return 0 if result["ranked"] else 1


def _cmd_replay(args: argparse.Namespace, console: Console) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from harness.sweep import replay as rp
    from harness.sweep.config import load_sweep

    cfg = load_sweep(args.sweep)
    if args.repeats <= 0:
        raise HarnessError(f"--repeats must be > 0 (got {args.repeats})")
    if not 0 < args.budget_fraction <= 5:
        raise HarnessError(f"--budget-fraction: expected a share of the full grid's GPU-seconds in (0, 5] "
                           f"(got {args.budget_fraction:g})")
    strategies = rp.parse_strategies(args.strategies)
    grid = rp.load_grid(Path(args.grid))
    slow = {"gp": args.gp_repeats} if args.gp_repeats else {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(label: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(f"replaying {label}", total=total)
            bar.update(tasks[label], completed=done)

        result = rp.replay(cfg, grid, strategies, args.repeats, seed=args.seed, budget_fraction=args.budget_fraction,
                           slow_repeats=slow, source=args.sweep, progress=progress)
    out = rp.write(result, Path(args.results_dir) / cfg.study, Path(args.sweep).name, args.budget_fraction,
                   figures=args.figures)
    console.print(out["md"].read_text(), markup=False, highlight=False)
    console.print("wrote " + ", ".join(str(p) for p in out.values()))
    return 0


def _cmd_bench(args: argparse.Namespace, console: Console) -> int:
    from harness.bench import runner as bench

    cfg = bench.load_bench(args.bench)
    if args.repeats:
        cfg = cfg.model_copy(update={"repeats": args.repeats})
    backends = args.backend.split(",") if args.backend else None
    if backends and not set(backends) <= {"unsloth", "hf"}:
        raise HarnessError(f"--backend: expected unsloth, hf or unsloth,hf (got {args.backend})")
    out_dir = Path(args.out or Path(args.results_dir) / "bench" / cfg.name)
    with console.status("benchmarking") as status:
        doc = bench.run_bench(cfg, out_dir, backends, progress=lambda msg: status.update(msg) or console.print(msg))
    comparison, warnings = (None, [])
    if args.baseline:
        comparison, warnings = bench.check(doc, Path(args.baseline), cfg.regression)
        write_text_atomic(out_dir / "junit.xml", bench.junit(doc, comparison))
    report = bench.markdown(doc, comparison, warnings)
    write_text_atomic(out_dir / "report.md", report)
    console.print(report, markup=False, highlight=False)
    for w in warnings:
        console.print(f"[yellow]warning:[/] {escape(w)}")
    if args.save_baseline:
        write_json_atomic(args.save_baseline, doc)
        console.print(f"baseline written to {args.save_baseline}")
    console.print(f"results: {out_dir / 'results.json'}, {out_dir / 'report.md'}")
    regressed = [c for c in comparison or [] if c["verdict"] in ("regressed", "missing")]
    if regressed:
        console.print(f"[red]{len(regressed)} regression(s)[/] against {args.baseline}")
        return 1
    return 0


def _cmd_warm(args: argparse.Namespace, console: Console) -> int:
    """``harness warm up | status | down``: resident workers, kept between studies."""
    from rich.table import Table

    from harness.launch import resident
    from harness.launch import nvidia_visible

    if args.action == "up":
        if args.max_trials <= 0:
            raise HarnessError(f"--max-trials must be > 0 (got {args.max_trials})")
        gpus = resident.parse_gpus(args.gpus, nvidia_visible())
        mode = args.mode or ("warm" if nvidia_visible() else "fork")
        started = resident.up(gpus, args.max_trials, fork=mode == "fork")
        states = {s.gpu: s for s in (resident.status(g) for g in gpus)}
        if args.wait:
            with console.status("resident workers importing the training stack") as shown:
                def on_wait(now: list) -> None:
                    shown.update("resident workers: " + ", ".join(f"{s.gpu} {s.state}" for s in now))

                states = {s.gpu: s for s in resident.wait_ready(gpus, args.timeout, on_wait)}
        for gpu in gpus:
            st = states[gpu]
            what = "started" if gpu in started else "already up"
            console.print(f"{gpu}: {what}, {st.state}" + (f" (log: {st.log})" if st.log else ""), highlight=False)
        failed = [g for g in gpus if states[g].state == "down"]
        if failed:
            raise HarnessError(f"the resident worker on {', '.join(failed)} did not start: see {resident.log_path(failed[0])}")
        return 0
    if args.action == "down":
        gpus = resident.parse_gpus(args.gpus, nvidia_visible()) if args.gpus else resident.known_gpus()
        stopped = resident.down(gpus)
        console.print(f"stopped: {', '.join(stopped)}" if stopped else "no resident worker was up", highlight=False)
        return 0
    gpus = resident.known_gpus()
    if not gpus:
        console.print("no resident worker (start them with: harness warm up --gpus 0,1)")
        return 0
    table = Table("gpu", "state", "mode", "worker pid", "studies", "trials", "base loaded", "up s", "log")
    for st in (resident.status(g) for g in gpus):
        w = st.worker or {}
        table.add_row(st.gpu, st.state, str(w.get("mode", "")), str(w.get("pid", "")), str(w.get("studies", "")), str(w.get("trials", "")),
                      str(w.get("base") or ""), str(w.get("up_s", "")), str(st.log or ""))
    Console(file=console.file, width=max(console.width, 160)).print(table)
    return 0


def _cmd_predict(args: argparse.Namespace, console: Console) -> int:
    from rich import box
    from rich.table import Table

    from harness import params
    from harness.sweep import predict as pm
    from harness.sweep.config import load_sweep

    if args.samples <= 0:
        raise HarnessError(f"--samples must be > 0 (got {args.samples})")
    cfg = load_sweep(args.sweep)
    arch = pm.architecture(cfg, Path(args.sweep).resolve().parent)
    configs, whole = pm.sweep_configs(cfg, args.samples)
    shown = list(dict.fromkeys([*cfg.search_space.searched(), "method", "batch_size", "lora_r"]))
    limits = [(f"{name} {limit:,.0f}", limit, ctx) for name, limit, ctx in
              (("memory_budget_mib", cfg.memory_budget_mib, False), ("--card-mib", args.card_mib, True)) if limit]
    table = Table(box=box.SIMPLE, pad_edge=False, title=f"{cfg.study}: predicted peak GPU memory, MiB "
                  f"({'the whole grid' if whole else f'{len(configs)} random samples, seed {cfg.seed}'})")
    for name in [*shown, "total", "fixed", "optim", "activ", ""]:
        table.add_column(name, justify="left" if name in ("method", "") else "right", no_wrap=True)
    for p in configs:
        pred = pm.predict(cfg, p, arch)
        g = pred.groups()
        over = any(pm.over_limit(pred, limit, cfg.predicted_oom_margin, include_context=ctx) for _, limit, ctx in limits)
        shown_values = params.applicable(p)
        table.add_row(*["-" if (v := shown_values[n]) is None else f"{v:.3g}" if isinstance(v, float) else str(v)
                        for n in shown],
                      f"{pred.total_mib:,.0f}", f"{g['fixed']:,.0f}", f"{g['optimizer']:,.0f}",
                      f"{g['activations']:,.0f}", "[red]over[/]" if over else "")
    Console(file=console.file, width=max(console.width, 200)).print(table)  # a pipe or a log keeps every column
    console.print(f"total: the CUDA context ({pm.CUDA_CONTEXT_MIB:,.0f}) + fixed (weights) + optim (adapters or "
                  "weights' training state) + activ (activations, logits)"
                  + (f"; over: predicted x {1 + cfg.predicted_oom_margin:g} > {' or '.join(n for n, _, _ in limits)}"
                     if limits else ""),
                  highlight=False)
    return 0


def _cmd_submit(args: argparse.Namespace, console: Console) -> int:
    """``harness submit slurm|k8s``: the study's drivers as a scheduler's array of tasks."""
    from harness.cluster import secrets
    from harness.sweep.config import load_sweep

    cfg = load_sweep(args.sweep)
    url = args.storage or cfg.storage
    if not url:
        raise HarnessError("harness submit: the tasks share one study: give --storage postgresql://user@host/db "
                           "(or storage: in the sweep file)")
    if args.n_trials is not None and args.n_trials <= 0:
        raise HarnessError(f"--n-trials must be > 0 (got {args.n_trials})")
    storage = secrets.split(url)
    gpus = args.gpus_per_worker or 0
    if gpus and gpus % cfg.gpus_per_trial:
        raise HarnessError(f"--gpus-per-worker {gpus}: each task's GPUs must split into trials of "
                           f"gpus_per_trial={cfg.gpus_per_trial}")
    common = dict(sweep=Path(args.sweep).resolve(), study=cfg.study, results_dir=Path(args.results_dir).resolve(),
                  storage=storage, workers=args.workers, cpus_per_worker=args.cpus_per_worker, n_trials=args.n_trials)
    if args.scheduler == "slurm":
        from harness.cluster import slurm

        job = slurm.SlurmJob(**common, gpus_per_worker=args.gpus_per_worker or 0, partition=args.partition,
                             time=args.time, requeue=args.requeue,
                             pgpass=secrets.pgpass_path(cfg.study) if storage.password is not None else None)
        if args.dry_run:
            print(slurm.render(job), end="")
            return 0
        if storage.password is not None:
            secrets.write_pgpass(cfg.study, storage)
        job_id = slurm.submit(job)
        console.print(f"submitted {job.script_path} as job {job_id}: {args.workers} tasks, each a `harness join` "
                      f"on {storage.url}; logs {job.folder}/{job_id}_<task>.out; watch with `squeue -j {job_id}`; "
                      f"the tables: `harness report {job.study_dir} --storage {storage.url}`", highlight=False)
        return 0
    from harness.cluster import k8s

    kjob = k8s.K8sJob(**common, image=args.image, secret=args.secret, results_claim=args.results_claim,
                      gpus_per_worker=1 if args.gpus_per_worker is None else args.gpus_per_worker,
                      namespace=args.namespace)
    if args.dry_run:
        print(k8s.render(kjob), end="")
        return 0
    out = k8s.apply(kjob)
    console.print(f"{out}\napplied {kjob.path}: {args.workers} pods; watch with "
                  f"`kubectl get pods -l harness/study={k8s.dns_name(cfg.study)}`", highlight=False)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description="Optuna sweeps of Unsloth LoRA fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)
    # `join` is `run` joined to a shared study: the same options, the storage required. (`worker`,
    # its old name, still works: a worker is the process that trains a driver's trials.)
    for name, help_, aliases in (("run", "run (or continue) the sweep a YAML file describes", []),
                                 ("join", "join a shared study (PostgreSQL or a journal file) and run its trials",
                                  ["worker"])):
        cmd = sub.add_parser(name, help=help_, aliases=aliases)
        cmd.add_argument("sweep", help="sweep file, e.g. sweeps/demo.yaml")
        cmd.add_argument("--n-trials", type=int, help="the study's total number of trials, across every driver that joins it")
        cmd.add_argument("--results-dir", default="results", help="where studies land (default: results)")
        cmd.add_argument("--storage", help="Optuna storage URL (overrides the file; default SQLite in the study "
                                           "folder, which other hosts cannot share)")
        cmd.add_argument("--gpus", help="GPU pool on this host, e.g. 0,1,2,3: one trial per GPU at once")
        cmd.add_argument("--no-figures", dest="figures", action="store_false",
                         help="at the end, the tables alone (trials.parquet, summary.md), no plots")
        cmd.set_defaults(func=_cmd_run)
    submit = sub.add_parser("submit", help="run a study's drivers on a cluster: a Slurm array job or a "
                                           "Kubernetes Indexed Job, each task a `harness join` on the shared storage")
    schedulers = submit.add_subparsers(dest="scheduler", required=True)
    for name, help_ in (("slurm", "an sbatch array of --workers tasks (the script: results/<study>/slurm/job.sbatch)"),
                        ("k8s", "an Indexed Job of --workers pods (the manifest: results/<study>/k8s/job.yaml)")):
        sc = schedulers.add_parser(name, help=help_)
        sc.add_argument("sweep", help="sweep file, e.g. sweeps/demo.yaml")
        sc.add_argument("--workers", type=int, required=True, help="tasks (drivers) to start, each joining the study")
        sc.add_argument("--storage", help="the shared storage, postgresql://user:password@host/db (the password "
                                          "reaches the tasks through a file or a Secret, never the script)")
        sc.add_argument("--gpus-per-worker", type=int,
                        help="GPUs per task, each one a slot of its driver (default: slurm 0, k8s 1)")
        sc.add_argument("--cpus-per-worker", type=int, help="CPU cores per task")
        sc.add_argument("--n-trials", type=int, help="the study's total number of trials (overrides the file)")
        sc.add_argument("--results-dir", default="results", help="the study's results folder, on a filesystem "
                                                                 "the nodes share (default: results)")
        sc.add_argument("--dry-run", action="store_true", help="print the script or manifest; submit nothing")
        if name == "slurm":
            sc.add_argument("--partition", help="Slurm partition")
            sc.add_argument("--time", help="time limit per task (sbatch's forms: minutes, HH:MM:SS, D-HH:MM, ...)")
            sc.add_argument("--requeue", action="store_true",
                            help="a preempted or failed-node task goes back in the queue and joins again")
        else:
            sc.add_argument("--image", required=True, help="container image with the harness installed")
            sc.add_argument("--secret", help="the Secret holding the storage password under key `password` "
                                             "(default harness-<study>-storage; created from --storage's password)")
            sc.add_argument("--results-claim", help="a ReadWriteMany PersistentVolumeClaim for the results folder "
                                                    "(without it, rebuild the tables with `harness report --storage`)")
            sc.add_argument("--namespace", help="Kubernetes namespace")
        sc.set_defaults(func=_cmd_submit)
    report = sub.add_parser("report", help="rebuild trials.parquet, summary.md, curves.png and the other "
                                           "figures from the storage")
    report.add_argument("study_dir", help="results/<study>")
    report.add_argument("--storage", help="storage URL when the study is not in the folder's study.db")
    report.add_argument("--no-figures", dest="figures", action="store_false", help="the tables alone, no plots")
    report.set_defaults(func=_cmd_report)
    b = sub.add_parser("bench", help="benchmark a fixed grid (Unsloth and/or the HF baseline), optionally against a baseline")
    b.add_argument("bench", help="bench file, e.g. bench/tiny-cpu.yaml")
    b.add_argument("--backend", help="unsloth, hf, or unsloth,hf (overrides the file)")
    b.add_argument("--repeats", type=int, help="processes per point (overrides the file)")
    b.add_argument("--baseline", help="compare against this results file; exit 1 on a regression")
    b.add_argument("--save-baseline", help="write this run's results as a baseline file")
    b.add_argument("--out", help="output folder (default: <results-dir>/bench/<name>)")
    b.add_argument("--results-dir", default="results")
    b.set_defaults(func=_cmd_bench)
    rr = sub.add_parser("rerun", help="retrain the top configs with fresh seeds: is the best really better "
                                      "(Welch's t-test, p < 0.05)?")
    rr.add_argument("study_dir", help="results/<study>")
    rr.add_argument("--top", type=int, default=2, help="how many of the best configs (default 2)")
    # 5: a true difference of two seed standard deviations reaches p < 0.05 in 77% of reruns at 5
    # seeds a side, 37% at 3 (simulated, normal seeds, Welch's test).
    rr.add_argument("--seeds", type=int, default=5, help="fresh seeds per config (default 5)")
    rr.add_argument("--storage", help="storage URL when the study is not in the folder's study.db")
    rr.set_defaults(func=_cmd_rerun)
    rp = sub.add_parser("replay", help="replay search strategies (samplers x pruners) against a recorded grid of "
                                       "learning curves: regret against GPU-seconds, no GPU")
    rp.add_argument("sweep", help="sweep file whose search space, sampler and pruner settings are replayed")
    rp.add_argument("--grid", required=True, help="recorded grid (Parquet, bench/grid.py), e.g. bench/grid/cpu-tiny.parquet")
    rp.add_argument("--repeats", type=int, default=100, help="searches per strategy (default 100)")
    rp.add_argument("--strategies", help="comma-separated sampler[+pruner], e.g. random,tpe+median (default: "
                                         "random, tpe, tpe+median, tpe+hyperband, tpe+dominance, random+median, gp, cmaes)")
    rp.add_argument("--gp-repeats", type=int, default=10,
                    help="at most this many searches for the gp sampler, which is slow (default 10; 0: --repeats)")
    rp.add_argument("--budget-fraction", type=float, default=0.5,
                    help="each search runs until it has spent this share of the full grid's GPU-seconds (default 0.5)")
    rp.add_argument("--seed", type=int, default=0, help="replay seed: samplers and the seeds drawn (default 0)")
    rp.add_argument("--results-dir", default="results", help="writes <results-dir>/<study>/replay.{md,parquet,png}")
    rp.add_argument("--no-figures", dest="figures", action="store_false", help="the tables alone, no replay.png")
    rp.set_defaults(func=_cmd_replay)
    ev = sub.add_parser("eval", help="reload the best weights (adapter or full model) and print their validation loss")
    ev.add_argument("study_dir", help="results/<study>")
    ev.add_argument("--weights", "--adapter", dest="weights",
                    help="a LoRA adapter or full model folder (default: <study_dir>/best)")
    ev.set_defaults(func=_cmd_eval)
    pr = sub.add_parser("predict", help="predict each config's peak GPU memory (no GPU, no torch)")
    pr.add_argument("sweep", help="sweep file, e.g. sweeps/mistral7b.yaml")
    pr.add_argument("--samples", type=int, default=8, help="random configs when the space has ranges (default 8)")
    pr.add_argument("--card-mib", type=float, help="mark configs predicted over this much GPU memory")
    pr.set_defaults(func=_cmd_predict)
    wm = sub.add_parser("warm", help="resident workers, kept between studies: warm up | status | down")
    wm.add_argument("action", choices=["up", "status", "down"])
    wm.add_argument("--gpus", help="GPUs on this host, e.g. 0,1 (default: 0; on a host without GPUs, one CPU worker; "
                                   "down: all that are up)")
    wm.add_argument("--max-trials", type=int, default=200,
                    help="a worker is replaced by a fresh one after this many trials (default 200)")
    wm.add_argument("--mode", choices=["warm", "fork"],
                    help="up: warm (trials in the worker, base kept; the default with GPUs) or fork (a fresh fork "
                         "per trial; the default without)")
    wm.add_argument("--no-wait", dest="wait", action="store_false", help="up: return without waiting for the imports")
    wm.add_argument("--timeout", type=float, default=300, help="up: how long to wait for the imports (default 300 s)")
    wm.set_defaults(func=_cmd_warm)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(soft_wrap=True)  # long paths stay on one line in logs
    try:
        return args.func(args, console)
    except HarnessError as err:
        console.print(f"[red]error:[/] {escape(str(err))}", highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted: the running trial was marked failed")
        return 130


if __name__ == "__main__":
    sys.exit(main())
