"""``harness submit k8s``: a study's drivers as a Kubernetes Indexed Job, each pod a ``harness
join`` on the study's shared storage.

The manifest (``results/<study>/k8s/job.yaml``) holds a ConfigMap with the sweep file (its
``storage`` key left out) and the Job: ``completionMode: Indexed``, one pod per worker, each
asking for its GPUs (``nvidia.com/gpu``), the storage URL without its password, and the password
read from a Secret into ``PGPASSWORD`` (``secretKeyRef``): never in the manifest. A pod the
cluster takes back (preemption, eviction, a drained node: the ``DisruptionTarget`` condition)
does not count against the Job's retries (``podFailurePolicy``), and its index runs again;
Kubernetes sends SIGTERM first, and the driver records its running trials as interrupted within
``terminationGracePeriodSeconds``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from harness import env
from harness.cluster.secrets import Storage
from harness.errors import HarnessError

GRACE_S = 60          # terminationGracePeriodSeconds: SIGTERM, then this long before SIGKILL
SWEEP_MOUNT = "/etc/harness"
RESULTS_MOUNT = "/results"
CACHE_MOUNT = "/cache"


def dns_name(text: str, limit: int = 63) -> str:
    """``text`` as a Kubernetes object name (RFC 1123: lowercase letters, digits, '-')."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return name[:limit].rstrip("-") or "study"


@dataclass(frozen=True)
class K8sJob:
    sweep: Path
    study: str
    results_dir: Path           # where job.yaml is written, on this machine
    storage: Storage            # its url has no password
    workers: int
    image: str
    secret: str | None = None   # the Secret holding the password (key ``password``); default per study
    results_claim: str | None = None  # a PersistentVolumeClaim for the results folder (ReadWriteMany)
    gpus_per_worker: int = 1
    cpus_per_worker: int | None = None
    n_trials: int | None = None
    namespace: str | None = None

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise HarnessError(f"--workers must be >= 1 (got {self.workers})")
        if self.gpus_per_worker < 0:
            raise HarnessError(f"--gpus-per-worker must be >= 0 (got {self.gpus_per_worker})")
        if not self.image or re.search(r"\s", self.image):
            raise HarnessError("--image: the container image holding the harness, e.g. registry.example/harness:1.0")

    @property
    def name(self) -> str:
        return dns_name(f"harness-{self.study}")

    @property
    def secret_name(self) -> str:
        return self.secret or dns_name(f"harness-{self.study}-storage", 253)

    @property
    def path(self) -> Path:
        return self.results_dir / self.study / "k8s" / "job.yaml"


def _sweep_text(sweep: Path) -> str:
    """The sweep file for the ConfigMap, without ``storage`` (the command line gives it, password-free)."""
    doc = yaml.safe_load(sweep.read_text())
    doc.pop("storage", None)
    return yaml.safe_dump(doc, sort_keys=False)


def manifest(job: K8sJob) -> list[dict]:
    """The ConfigMap and the Indexed Job, as objects."""
    labels = {"app.kubernetes.io/name": "harness", "harness/study": dns_name(job.study)}
    meta = {"labels": labels, **({"namespace": job.namespace} if job.namespace else {})}
    config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{job.name}-sweep", **meta},
              "data": {"sweep.yaml": _sweep_text(job.sweep)}}
    command = ["harness", "join", f"{SWEEP_MOUNT}/sweep.yaml", "--storage", job.storage.url,
               "--results-dir", RESULTS_MOUNT, "--no-figures"]
    if job.n_trials is not None:
        command += ["--n-trials", str(job.n_trials)]
    if job.gpus_per_worker > 1:  # the pod sees its GPUs as 0..G-1: each one a slot of its driver
        command += ["--gpus", ",".join(map(str, range(job.gpus_per_worker)))]
    environment = [
        {"name": env.POD_NAME, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": env.CACHE, "value": CACHE_MOUNT},
    ]
    if job.storage.url.startswith("postgresql"):
        environment.append({"name": "PGPASSWORD", "valueFrom": {"secretKeyRef": {
            # Required when the password is known to be there (from --storage, or --secret named);
            # otherwise the pods may authenticate another way (a client certificate, say).
            "name": job.secret_name, "key": "password",
            "optional": job.storage.password is None and job.secret is None}}})
    resources: dict = {}
    if job.gpus_per_worker:
        resources["limits"] = {"nvidia.com/gpu": job.gpus_per_worker}
    if job.cpus_per_worker:
        resources["requests"] = {"cpu": str(job.cpus_per_worker)}
    results = ({"persistentVolumeClaim": {"claimName": job.results_claim}} if job.results_claim else {"emptyDir": {}})
    container = {
        "name": "driver", "image": job.image, "command": command, "env": environment,
        "volumeMounts": [{"name": "sweep", "mountPath": SWEEP_MOUNT, "readOnly": True},
                         {"name": "results", "mountPath": RESULTS_MOUNT},
                         {"name": "cache", "mountPath": CACHE_MOUNT},
                         {"name": "shm", "mountPath": "/dev/shm"}],
    }
    if resources:
        container["resources"] = resources
    job_obj = {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": job.name, **meta},
        "spec": {
            "completionMode": "Indexed", "completions": job.workers, "parallelism": job.workers,
            "backoffLimit": 2 * job.workers,
            # Taken back by the cluster (preemption, eviction, drain): not the pod's failure; the
            # index runs again and joins the study.
            "podFailurePolicy": {"rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]},
            "template": {
                "metadata": {"labels": dict(labels)},  # a copy: safe_dump writes no YAML anchor
                "spec": {
                    "restartPolicy": "Never",  # podFailurePolicy requires it
                    "terminationGracePeriodSeconds": GRACE_S,
                    "containers": [container],
                    "volumes": [{"name": "sweep", "configMap": {"name": f"{job.name}-sweep"}},
                                {"name": "results", **results},
                                {"name": "cache", "emptyDir": {}},
                                {"name": "shm", "emptyDir": {"medium": "Memory"}}],
                },
            },
        },
    }
    return [config, job_obj]


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the sweep file in the ConfigMap) as literal blocks, readable as written."""


_Dumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def render(job: K8sJob) -> str:
    header = (f"# harness submit k8s: study {job.study}, {job.workers} pods, each a `harness join` on the shared "
              f"storage.\n# The storage password: Secret {job.secret_name} (key: password), never here.\n")
    return header + yaml.dump_all(manifest(job), Dumper=_Dumper, sort_keys=False)


def write(job: K8sJob) -> Path:
    job.path.parent.mkdir(parents=True, exist_ok=True)
    job.path.write_text(render(job))
    return job.path


def apply(job: K8sJob) -> str:
    """Write the manifest and ``kubectl apply`` it; with a password in the URL, the Secret is
    created first from standard input (never a file, never the command line)."""
    if shutil.which("kubectl") is None:
        raise HarnessError("kubectl is not on PATH: apply results/<study>/k8s/job.yaml from a machine that has it "
                           "(see it with --dry-run)")
    path = write(job)
    if job.storage.password is not None:
        secret = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                  "metadata": {"name": job.secret_name, **({"namespace": job.namespace} if job.namespace else {})},
                  "stringData": {"password": job.storage.password}}
        _kubectl(["apply", "-f", "-"], yaml.safe_dump(secret), f"creating Secret {job.secret_name}")
    return _kubectl(["apply", "-f", str(path)], None, f"applying {path}")


def _kubectl(args: list[str], stdin: str | None, what: str) -> str:
    feed = {"input": stdin} if stdin is not None else {"stdin": subprocess.DEVNULL}
    proc = subprocess.run(["kubectl", *args], capture_output=True, text=True, **feed)
    if proc.returncode != 0:
        raise HarnessError(f"kubectl: {what} failed: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout.strip()
