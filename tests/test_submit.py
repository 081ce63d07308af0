"""``harness submit slurm|k8s`` without a cluster: the batch script and the manifest render with the
right fields, hold no password, write nothing on --dry-run, and bad arguments are one-line errors.
The password file is one libpq really reads (against the tests' PostgreSQL)."""

import stat

import pytest
import sqlalchemy
import yaml

from conftest import PG_PASSWORD
from harness.cli import main
from harness.cluster import placement, secrets

SWEEP = {"study": "scaled", "model": {"name": "tiny-mistral"}, "dataset": {"source": "shakespeare"},
         "storage": f"postgresql://harness:{PG_PASSWORD}@db.example:5433/studies"}
PUBLIC = "postgresql://harness@db.example:5433/studies"


@pytest.fixture
def sweep(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_SECRETS", str(tmp_path / "secrets"))
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(SWEEP))
    return path


def submit(capsys, *args: str) -> tuple[int, str]:
    code = main(["submit", *args])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_slurm_dry_run_prints_the_array_script_without_the_password(sweep, tmp_path, capsys):
    code, script = submit(capsys, "slurm", str(sweep), "--workers", "3", "--gpus-per-worker", "2", "--partition",
                          "gpu", "--time", "2:00:00", "--requeue", "--cpus-per-worker", "8", "--results-dir",
                          str(tmp_path / "results"), "--dry-run")
    assert code == 0, script
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for directive in ("--array=0-2", "--gpus-per-task=2", "--cpus-per-task=8", "--partition=gpu", "--time=2:00:00",
                      "--signal=B:TERM@90", "--requeue", "--open-mode=append", "--job-name=harness-scaled",
                      f"--output={tmp_path}/results/scaled/slurm/%A_%a.out"):
        assert f"#SBATCH {directive}" in lines, directive
    assert f"export PGPASSFILE={tmp_path}/secrets/scaled.pgpass" in lines
    [command] = [line for line in lines if line.startswith("exec ")]
    assert f"-m harness.cli join {sweep} --storage {PUBLIC} --results-dir {tmp_path}/results" in command
    assert command.endswith('${CUDA_VISIBLE_DEVICES:+--gpus "$CUDA_VISIBLE_DEVICES"}')  # its GPUs are its slots
    assert PG_PASSWORD not in script
    assert not (tmp_path / "results").exists() and not (tmp_path / "secrets").exists(), "a dry run writes nothing"


def test_slurm_cpu_tasks_without_a_password_name_no_password_file(sweep, tmp_path, capsys):
    code, script = submit(capsys, "slurm", str(sweep), "--workers", "1", "--storage",
                          f"journal:///{tmp_path}/shared/study.log", "--dry-run")
    assert code == 0, script
    assert "--array=0-0" in script and "--no-requeue" in script and "PGPASSFILE" not in script
    assert "--gpus" not in script and "--time" not in script


def test_a_password_in_the_query_string_is_taken_out_too():
    split = secrets.split(f"postgresql://harness@db:5432/studies?password={PG_PASSWORD}&sslmode=require")
    assert split.password == PG_PASSWORD and PG_PASSWORD not in split.url and "sslmode=require" in split.url
    assert (split.host, split.port, split.database, split.user) == ("db", 5432, "studies", "harness")


@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "--workers must be >= 1"),
    (["--workers", "2", "--time", "soon"], "--time soon: expected"),
    (["--workers", "2", "--storage", "sqlite:///x.db"], "SQLite is one host's"),
    (["--workers", "2", "--storage", "mysql://u:pw@h/db"], "only a PostgreSQL password"),
    (["--workers", "2", "--gpus-per-worker", "-1"], "--gpus-per-worker must be >= 0"),
])
def test_bad_arguments_are_one_line_errors(sweep, capsys, args, message):
    code, out = submit(capsys, "slurm", str(sweep), *args, "--dry-run")
    assert code == 2 and message in out and "Traceback" not in out, out


def test_no_shared_storage_is_an_error(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in SWEEP.items() if k != "storage"}))
    code, out = submit(capsys, "slurm", str(path), "--workers", "2", "--dry-run")
    assert code == 2 and "share one study: give --storage" in out


def test_without_sbatch_submit_says_so(sweep, capsys, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    code, out = submit(capsys, "slurm", str(sweep), "--workers", "2")
    assert code == 2 and "sbatch is not on PATH" in out


def test_the_password_file_is_private_and_libpq_reads_it(tmp_path, monkeypatch, postgres):
    monkeypatch.setenv("HARNESS_SECRETS", str(tmp_path / "secrets"))
    split = secrets.split(postgres.url)
    assert split.password == PG_PASSWORD and PG_PASSWORD not in split.url
    path = secrets.write_pgpass("scaled", split)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    # What a task does: the URL without the password, PGPASSFILE naming the file.
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(path))
    with sqlalchemy.create_engine(split.url).connect() as conn:
        assert conn.execute(sqlalchemy.text("select 1")).scalar() == 1
    # libpq's escapes: a ':' or '\' in a field does not end it.
    odd = secrets.Storage("postgresql://u@h/d", "a:b\\c", "h", 5432, "d", "u")
    assert secrets.write_pgpass("odd", odd).read_text() == "h:5432:d:u:a\\:b\\\\c\n"


def test_k8s_dry_run_renders_an_indexed_job_with_the_password_as_a_secret(sweep, tmp_path, capsys):
    code, text = submit(capsys, "k8s", str(sweep), "--workers", "4", "--image", "registry.example/harness:1",
                        "--gpus-per-worker", "2", "--results-claim", "studies-rwx", "--n-trials", "40",
                        "--results-dir", str(tmp_path / "results"), "--dry-run")
    assert code == 0, text
    assert PG_PASSWORD not in text
    config, job = list(yaml.safe_load_all(text))
    assert config["kind"] == "ConfigMap" and "storage" not in yaml.safe_load(config["data"]["sweep.yaml"])
    assert yaml.safe_load(config["data"]["sweep.yaml"])["study"] == "scaled"
    spec = job["spec"]
    assert job["kind"] == "Job" and job["apiVersion"] == "batch/v1" and job["metadata"]["name"] == "harness-scaled"
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 4
    assert spec["podFailurePolicy"]["rules"][0]["onPodConditions"] == [{"type": "DisruptionTarget"}]
    pod = spec["template"]["spec"]
    [container] = pod["containers"]
    assert pod["restartPolicy"] == "Never" and pod["terminationGracePeriodSeconds"] >= 30
    assert container["image"] == "registry.example/harness:1"
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 2}
    command = container["command"]
    assert command[:3] == ["harness", "join", "/etc/harness/sweep.yaml"]
    assert command[command.index("--storage") + 1] == PUBLIC and command[command.index("--gpus") + 1] == "0,1"
    assert command[command.index("--n-trials") + 1] == "40"
    env = {e["name"]: e for e in container["env"]}
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "harness-scaled-storage", "key": "password",
                                                             "optional": False}
    assert env["HARNESS_POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["results"]["persistentVolumeClaim"]["claimName"] == "studies-rwx"
    assert volumes["sweep"]["configMap"]["name"] == config["metadata"]["name"]
    assert not (tmp_path / "results").exists()


def test_k8s_needs_an_image_and_kubectl(sweep, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        main(["submit", "k8s", str(sweep), "--workers", "2", "--dry-run"])  # argparse: --image is required
    monkeypatch.setenv("PATH", "/nonexistent")
    code, out = submit(capsys, "k8s", str(sweep), "--workers", "2", "--image", "h:1")
    assert code == 2 and "kubectl is not on PATH" in out


def test_trials_record_their_scheduler_task(monkeypatch):
    for name in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_ID", "JOB_COMPLETION_INDEX",
                 "HARNESS_POD_NAME"):
        monkeypatch.delenv(name, raising=False)
    assert placement() == {}
    monkeypatch.setenv("SLURM_JOB_ID", "17")
    assert placement() == {"slurm_task": "17"}
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "12")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert placement() == {"slurm_task": "12_3"}
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID")
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    monkeypatch.setenv("HARNESS_POD_NAME", "harness-scaled-2-x7k")
    assert placement() == {"k8s_index": 2, "k8s_pod": "harness-scaled-2-x7k"}


def test_a_task_s_gpus_must_split_into_trials(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HARNESS_SECRETS", str(tmp_path / "secrets"))
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**SWEEP, "gpus_per_trial": 2}))
    code, out = submit(capsys, "slurm", str(path), "--workers", "2", "--gpus-per-worker", "3", "--dry-run")
    assert code == 2 and "must split into trials of gpus_per_trial=2" in out
    code, out = submit(capsys, "slurm", str(path), "--workers", "2", "--gpus-per-worker", "4", "--dry-run")
    assert code == 0 and "#SBATCH --gpus-per-task=4" in out


def test_k8s_apply_hands_the_password_to_kubectl_on_stdin_only(sweep, tmp_path, capsys, monkeypatch):
    """A stand-in kubectl records what it is given: the Secret comes on standard input, never on
    the command line or in the manifest file; then the manifest is applied."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/argv\ncat >> {tmp_path}/stdin\necho applied\n')
    kubectl.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    code, out = submit(capsys, "k8s", str(sweep), "--workers", "2", "--image", "h:1", "--results-dir",
                       str(tmp_path / "results"))
    assert code == 0, out
    manifest = tmp_path / "results" / "scaled" / "k8s" / "job.yaml"
    assert (tmp_path / "argv").read_text().splitlines() == ["apply -f -", f"apply -f {manifest}"]
    secret = yaml.safe_load((tmp_path / "stdin").read_text())
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == "harness-scaled-storage"
    assert secret["stringData"] == {"password": PG_PASSWORD}
    assert PG_PASSWORD not in manifest.read_text() + out + (tmp_path / "argv").read_text()
