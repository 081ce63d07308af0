"""The live view of a running study (rich): trials done of total with the best so far, and each
running trial's progress, one line per slot (a GPU of the pool, or the single slot)."""

from __future__ import annotations

import threading
from typing import Any

import optuna
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from harness.records import TrialResult
from harness.sweep.best import best_trial


def format_params(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


class Display:
    def __init__(self, console: Console, total: int, done: int, slots: list[str]):
        self.console = console
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, transient=False,
        )
        self.trials = self.progress.add_task("trials", total=total, completed=done)
        self.steps = {slot: self.progress.add_task("", total=1, visible=False) for slot in slots}
        self.tag = {slot: (escape(f"[gpu {slot}] ") if len(slots) > 1 or "," in slot else "") for slot in slots}
        self.best: str = "-"
        self.lock = threading.Lock()

    def __enter__(self) -> "Display":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def start_trial(self, slot: str, number: int, params: dict[str, Any], retry_of: int | None = None) -> None:
        again = f" (a retry of trial {retry_of})" if retry_of is not None else ""
        self.console.print(f"{self.tag[slot]}[bold]trial {number}[/] {format_params(params)}{again}")
        self.progress.update(self.steps[slot], description=f"  {self.tag[slot]}trial {number}: starting",
                             completed=0, total=1, visible=True)

    def on_event(self, slot: str, number: int, ev: dict) -> None:
        kind, task, tag = ev.get("kind"), self.steps[slot], self.tag[slot]
        if kind == "phase":
            self.progress.update(task, description=f"  {tag}trial {number}: {ev['phase']}")
        elif kind == "step":
            self.progress.update(task, completed=round(1000 * ev["done"]), total=1000,
                                 description=f"  {tag}trial {number}: step {ev['step']} loss {ev['loss']:.3f}")
        elif kind == "eval":
            seed = f" seed {ev['seed']}" if ev.get("seed") is not None else ""
            self.console.print(f"  {tag}trial {number}{seed} at {ev['milestone']:>8,}  val_loss {ev['val_loss']:.4f}"
                               + ("  → prune" if ev["prune"] else ""))

    def end_trial(self, slot: str, result: TrialResult, study: optuna.Study, retried: bool) -> None:
        m, tag, number = result.metrics, self.tag[slot], result.number
        if result.state == "fail":
            first = (result.reason or "").splitlines()[0] if result.reason else ""
            then = " [yellow]: it will run again[/]" if retried else ""
            self.console.print(f"  {tag}[red]trial {number} failed[/]: {escape(first)}{then}")
        elif result.outcome == "not_converged":
            self.console.print(f"  {tag}trial {number} [yellow]not converged[/]: best val_loss {m.best_val_loss:.4f}")
        elif result.outcome == "predicted_oom":
            self.console.print(f"  {tag}trial {number} [yellow]skipped[/]: {escape(result.reason or '')}")
        elif result.outcome == "oom":
            self.console.print(f"  {tag}trial {number} [yellow]infeasible[/]: out of memory at "
                               f"{m.mem_at_failure_mib or 0:,.0f} MiB (peak {m.peak_mem_mib or 0:,.0f} MiB)")
        else:
            if result.pruned_by == "dominance":
                self.console.print(f"  {tag}trial {number} [yellow]pruned[/]: {escape(result.reason or '')}")
            spread = f" ± {m.value_std:.4f} over {len(m.seed_values)} seeds" if m.seed_values else ""
            ttt = f"  time to target {m.time_to_target:,.0f}" if m.time_to_target is not None else ""
            self.console.print(
                f"  {tag}trial {number} [green]{result.outcome}[/] val_loss {m.val_loss:.4f}{spread}{ttt}  "
                f"{m.tokens_per_s or 0:,.0f} tok/s  peak {m.peak_mem_mib or 0:,.0f} MiB  train {m.train_s or 0:.1f}s"
                + ("  [yellow]over the memory budget: infeasible[/]" if result.outcome == "over_budget" else "")
            )
        with self.lock:
            best = best_trial(study)
            names = study.metric_names or ["val_loss"]
            i = int(study.user_attrs.get("prefer", 0)) if len(study.directions) > 1 else 0
            if best is not None:
                self.best = f"{best.values[i]:,.4g} (trial {best.number})"
                if len(study.directions) > 1:
                    self.best += f", Pareto front of {len(study.best_trials)}"
            self.progress.update(self.steps[slot], visible=False)
            if not retried:
                self.progress.update(self.trials, advance=1, description=f"trials  best {names[i]} {self.best}")

    def waiting(self, running: int) -> None:
        self.console.print(f"no new trials to start: waiting for the {running} running trial(s) to finish "
                           f"(here or on other workers)")
