"""Studies on a cluster: ``harness submit slurm`` (an sbatch array, :mod:`.slurm`) and ``harness
submit k8s`` (an Indexed Job, :mod:`.k8s`), each task a ``harness join`` on the study's shared
storage, its password kept out of what the scheduler stores (:mod:`.secrets`).

Torch-free. What a task knows of where it runs (:func:`placement`) is recorded on its trials.
"""

from __future__ import annotations

import os

from harness import env


def placement() -> dict[str, str | int]:
    """Which scheduler task this driver is, as trial user attributes: ``slurm_task`` (the array
    job and task, ``1234_5``, or the job id), ``k8s_index`` and ``k8s_pod``. Empty elsewhere."""
    out: dict[str, str | int] = {}
    if (job := os.environ.get("SLURM_ARRAY_JOB_ID")) and (task := os.environ.get("SLURM_ARRAY_TASK_ID")):
        out["slurm_task"] = f"{job}_{task}"
    elif job := os.environ.get("SLURM_JOB_ID"):
        out["slurm_task"] = job
    if (index := os.environ.get("JOB_COMPLETION_INDEX", "")).isdigit():
        out["k8s_index"] = int(index)
    if pod := os.environ.get(env.POD_NAME):
        out["k8s_pod"] = pod
    return out
