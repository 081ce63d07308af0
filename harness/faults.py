"""The fault-injection hook: a documented test hook that makes a trial process fail for real.

``HARNESS_FAULTS="1:sigkill@3,2:nan@2"`` makes trial 1 kill itself with SIGKILL after step 3 and
trial 2 turn its weights to NaN after step 2. Each fault acts after the named optimizer step;
step 0 means before the model loads (a process that dies before training), and ``*`` in place of
a trial number means every trial:

==========  ===================================================================================
sigkill     the process sends itself SIGKILL (a crash with no traceback, no result file)
segfault    the process reads address 0 (a real segmentation fault)
nan         a trainable weight becomes NaN: the next step's loss is NaN and the trial stops
hang        the process sleeps forever: the driver kills it after ``budget.hang_timeout_s``
oom         the process asks its device for 64 TiB: a real allocator failure (out of memory)
leak        the trial keeps 320 MiB of tensors alive after it ends: a warm worker finds them
            and retires
wandb       the trial's W&B run (kept by the driver) raises "No space left on device" at its next
            call: W&B turns off for that trial, the trial goes on
sigterm     the driver sends itself SIGTERM as it has just asked for the trial, before starting it
            (a scheduler taking the task back between two trials): the trial is recorded
            interrupted, not left running
==========  ===================================================================================

Nothing happens unless the variable is set. The fault suite (tests/test_faults.py) drives it.
The worker injects every kind but ``wandb``, which the driver injects into its tracker
(``harness.sweep.trackers``), and ``sigterm``, which the driver sends itself. Torch is imported only to inject.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import time
from dataclasses import dataclass
from harness import env

KINDS = ("sigkill", "segfault", "nan", "hang", "oom", "leak", "wandb", "sigterm")
LEAKED: list = []  # what the ``leak`` fault keeps alive


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int


def planned(trial_number: int, spec: str | None = None) -> Fault | None:
    """The fault planned for this trial, if any (``N:kind@step``, comma separated)."""
    spec = os.environ.get(env.FAULTS, "") if spec is None else spec
    for item in filter(None, (s.strip() for s in spec.split(","))):
        number, _, rest = item.partition(":")
        kind, _, step = rest.partition("@")
        if kind not in KINDS:
            raise ValueError(f"HARNESS_FAULTS: unknown fault '{kind}' in '{item}'; known: {', '.join(KINDS)}")
        if number == "*" or int(number) == trial_number:
            return Fault(kind, int(step or 1) if step != "0" else 0)
    return None


def inject(fault: Fault, model, device: str) -> None:
    """In the worker: make ``fault`` happen now (``wandb`` and ``sigterm`` are the driver's: nothing here)."""
    import torch

    if fault.kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault.kind == "segfault":
        ctypes.string_at(0)
    elif fault.kind == "nan":
        with torch.no_grad():
            next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))
    elif fault.kind == "hang":
        while True:
            time.sleep(3600)
    elif fault.kind == "oom":
        torch.empty(1 << 46, dtype=torch.uint8, device=device)
    elif fault.kind == "leak":
        LEAKED.append(torch.ones(320 << 20, dtype=torch.uint8, device=device))


def disk_full() -> OSError:
    """What the ``wandb`` fault raises in the trial's W&B run."""
    return OSError(errno.ENOSPC, "No space left on device")
