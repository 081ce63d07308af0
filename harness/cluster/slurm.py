"""``harness submit slurm``: a study's drivers as one Slurm array job, each task a ``harness join``
on the study's shared storage.

A plain ``sbatch`` script, not ``submitit``: submitit pickles a Python callable, so every node
needs the very same Python and packages to unpickle it, and it keeps its own folder of pickled
calls and results. The task here is a command line that already exists (``harness join``); a
script a user can read, edit and resubmit with ``sbatch`` is what HPC users expect, and its text
can be checked for secrets (the tests do).

Preemption and time limits: Slurm sends SIGTERM, then SIGKILL ``KillWait`` seconds later (30 by
default). The script ``exec``\\s the driver, so the driver is the batch step and gets the SIGTERM
itself: it starts no more trials, records its running ones as interrupted (retried first by the
other tasks, not counted) and exits with 143 within a few seconds (:mod:`harness.sweep.signals`).
With ``--time``, ``--signal=B:TERM@90`` sends that SIGTERM 90 s before the limit, so a trial
is not cut off by the hard kill. A task killed outright (SIGKILL, a lost node) is found by the
other drivers' heartbeat check, as on any host. With ``--requeue`` a preempted task goes back in
the queue and, when it runs again, joins the study again (its log is appended to).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from harness.cluster.secrets import Storage
from harness.errors import HarnessError

# SIGTERM this long before the time limit (``--signal=B:TERM@...``): time to record the running
# trials and exit, well before the hard kill. Slurm may send it up to 60 s early.
SIGNAL_BEFORE_LIMIT_S = 90
_TIME = re.compile(r"^(\d+-\d{1,2}(:\d{1,2}(:\d{1,2})?)?|\d+(:\d{1,2}(:\d{1,2})?)?)$")  # sbatch's forms
_NAME = re.compile(r"^[\w.+-]+$")


@dataclass(frozen=True)
class SlurmJob:
    """What the batch script says: the study's files, the array's shape, the resources per task."""

    sweep: Path                 # absolute
    study: str
    results_dir: Path           # absolute: every task writes the study's one results folder
    storage: Storage            # its url has no password
    workers: int
    gpus_per_worker: int = 0
    cpus_per_worker: int | None = None
    partition: str | None = None
    time: str | None = None
    requeue: bool = False
    n_trials: int | None = None
    pgpass: Path | None = None  # where the password file is (the tasks' PGPASSFILE), if any
    python: str = sys.executable  # this Python (a venv every node mounts): the harness the tasks run
    workdir: Path = field(default_factory=Path.cwd)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise HarnessError(f"--workers must be >= 1 (got {self.workers})")
        if self.gpus_per_worker < 0:
            raise HarnessError(f"--gpus-per-worker must be >= 0 (got {self.gpus_per_worker})")
        if self.cpus_per_worker is not None and self.cpus_per_worker < 1:
            raise HarnessError(f"--cpus-per-worker must be >= 1 (got {self.cpus_per_worker})")
        if self.time is not None and not _TIME.match(self.time):
            raise HarnessError(f"--time {self.time}: expected minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
        if self.partition is not None and not _NAME.match(self.partition):
            raise HarnessError(f"--partition {self.partition}: not a partition name")
        for path in (self.study_dir, self.workdir):
            if re.search(r"\s", str(path)):  # #SBATCH lines are not parsed by a shell: no quoting there
                raise HarnessError(f"{path}: Slurm's #SBATCH paths cannot hold spaces; use another --results-dir")

    @property
    def study_dir(self) -> Path:
        return self.results_dir / self.study

    @property
    def folder(self) -> Path:
        """``results/<study>/slurm/``: the script and the tasks' logs."""
        return self.study_dir / "slurm"

    @property
    def script_path(self) -> Path:
        return self.folder / "job.sbatch"


def render(job: SlurmJob) -> str:
    """The batch script. It holds no password: the storage URL without it, and the path of the
    password file, which only the user can read."""
    q = shlex.quote
    directives = [
        f"--job-name=harness-{job.study if _NAME.match(job.study) else 'study'}",
        f"--array=0-{job.workers - 1}",
        f"--output={job.folder}/%A_%a.out",
        f"--chdir={job.workdir}",
        "--ntasks=1",
        "--export=ALL",  # the submitting shell's environment (HARNESS_CACHE, WANDB_*, ...), as sbatch's default
    ]
    if job.cpus_per_worker:
        directives.append(f"--cpus-per-task={job.cpus_per_worker}")
    if job.gpus_per_worker:
        directives.append(f"--gpus-per-task={job.gpus_per_worker}")
    if job.partition:
        directives.append(f"--partition={job.partition}")
    if job.time:
        directives += [f"--time={job.time}", f"--signal=B:TERM@{SIGNAL_BEFORE_LIMIT_S}"]
    # A requeued task runs the script again: its log grows instead of starting over.
    directives += ["--requeue", "--open-mode=append"] if job.requeue else ["--no-requeue"]
    command = [q(job.python), "-m", "harness.cli", "join", q(str(job.sweep)), "--storage", q(job.storage.url),
               "--results-dir", q(str(job.results_dir)), "--no-figures"]
    if job.n_trials is not None:
        command += ["--n-trials", str(job.n_trials)]
    if job.gpus_per_worker:
        # Each GPU Slurm gave the task is one of its driver's slots.
        command.append('${CUDA_VISIBLE_DEVICES:+--gpus "$CUDA_VISIBLE_DEVICES"}')
    lines = [
        "#!/bin/bash",
        f"# harness submit slurm: study {job.study}, {job.workers} tasks, each a `harness join` on the shared storage.",
        "# Resubmit as it is with `sbatch` (more tasks: --array=0-N); the study's n_trials holds across all of them.",
        *(f"#SBATCH {d}" for d in directives),
        "set -euo pipefail",
    ]
    if job.pgpass is not None:
        lines += ["# The storage's password: in this file (mode 0600, yours alone), never in this script.",
                  f"export PGPASSFILE={q(str(job.pgpass))}"]
    lines += [
        'echo "harness: task ${SLURM_ARRAY_JOB_ID:-?}_${SLURM_ARRAY_TASK_ID:-?} on $(hostname),'
        ' run ${SLURM_RESTART_COUNT:-0}, GPUs ${CUDA_VISIBLE_DEVICES:-none}"',
        "# exec: the driver is the batch step, so Slurm's SIGTERM (preemption, time limit, scancel) reaches it.",
        "exec " + " ".join(command),
        "",
    ]
    return "\n".join(lines)


def write(job: SlurmJob) -> Path:
    job.folder.mkdir(parents=True, exist_ok=True)
    job.script_path.write_text(render(job))
    return job.script_path


def submit(job: SlurmJob) -> str:
    """Write the script and ``sbatch`` it; the array job's id."""
    if shutil.which("sbatch") is None:
        raise HarnessError("sbatch is not on PATH: run `harness submit slurm` on a Slurm login node "
                           "(or look at the script with --dry-run)")
    script = write(job)
    proc = subprocess.run(["sbatch", "--parsable", str(script)], cwd=job.workdir, capture_output=True, text=True)
    if proc.returncode != 0:
        raise HarnessError(f"sbatch {script} failed: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout.strip().split(";")[0]
