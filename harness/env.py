"""Every environment variable the harness reads, or sets for the processes it starts: here and
nowhere else. Processes otherwise talk over the channel of :mod:`harness.protocol` (parameters,
milestones, records), never through the environment. Plain data: imports nothing.

The harness's own:

==============================  ==================================================================
``HARNESS_CACHE``               (you) where built models, tokenized data, compiled kernels and
                                resident workers' logs live; default ``~/.cache/harness``
``HARNESS_FAULTS``              (tests) faults to inject into trials, ``N:kind@step,...``
                                (:mod:`harness.faults`)
``HARNESS_PREPARE_PROGRESS``    (driver → the prepare process) the file it keeps pretraining's
                                progress in, for the live view
``HARNESS_SPAWNED_AT``          (bench runner → a bench point's process) when it was started
``HARNESS_SECRETS``             (you, tests) where ``harness submit slurm`` writes a study's
                                password file; default ``~/.harness/secrets``
``HARNESS_POD_NAME``            (a Kubernetes Job's manifest → its pods) the pod's name, recorded
                                on its trials as ``k8s_pod``
==============================  ==================================================================

Others' variables the harness sets for its workers (a value you set yourself wins where noted):
``CUDA_VISIBLE_DEVICES`` (a slot's GPUs), ``OMP_NUM_THREADS`` (a GPU pool's share of the host's
cores; yours wins), ``TORCHINDUCTOR_CACHE_DIR`` and ``TRITON_CACHE_DIR`` (compiled kernels under
``HARNESS_CACHE``; yours win), ``PYTHONUNBUFFERED``, ``UNSLOTH_DISABLE_STATISTICS`` and
``TOKENIZERS_PARALLELISM`` (defaults only); a Slurm task's ``PGPASSFILE`` (its batch script sets it:
:mod:`harness.cluster.secrets`). It reads ``WANDB_MODE``, ``WANDB_BASE_URL`` and
whether ``WANDB_API_KEY`` or a netrc entry exists (never the key itself: sweep/wandb_check.py),
``XDG_CACHE_HOME``, Slurm's ``SLURM_ARRAY_JOB_ID``, ``SLURM_ARRAY_TASK_ID`` and ``SLURM_JOB_ID``
and Kubernetes' ``JOB_COMPLETION_INDEX`` (recorded on each trial: :mod:`harness.cluster`), and torchrun's ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK`` in a warm group.
"""

CACHE = "HARNESS_CACHE"
FAULTS = "HARNESS_FAULTS"
PREPARE_PROGRESS = "HARNESS_PREPARE_PROGRESS"
SPAWNED_AT = "HARNESS_SPAWNED_AT"
SECRETS = "HARNESS_SECRETS"
POD_NAME = "HARNESS_POD_NAME"
