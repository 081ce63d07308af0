import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# No hub, no W&B server, no telemetry: everything the tests touch is local.
os.environ.update(HF_HUB_OFFLINE="1", UNSLOTH_DISABLE_STATISTICS="1", WANDB_MODE="offline",
                  TOKENIZERS_PARALLELISM="false")


@pytest.fixture(scope="session")
def harness_cache(tmp_path_factory) -> Path:
    """A fresh cache per test session: the embedded model and corpus are built on first use."""
    path = tmp_path_factory.mktemp("harness-cache")
    os.environ["HARNESS_CACHE"] = str(path)
    return path


def run_cli(*args: str, cwd: Path = ROOT, timeout: int = 900) -> subprocess.CompletedProcess:
    """The installed CLI, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ))


PG_PASSWORD = "pg-Secret-7c1f9e"


def _pg_bin(name: str) -> str:
    import glob
    import shutil

    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name)]
    if not found or not found[-1]:
        pytest.skip(f"PostgreSQL's {name} is not installed (.ci/run installs it)")
    return found[-1]


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server on a free loopback port, with a password, for this test session."""
    import shutil
    import socket
    import tempfile

    # Not under pytest's tmp folder: that is private to root, and the server runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="harness-pg-"))
    data, pwfile = root / "data", root / "pw"
    pwfile.write_text(PG_PASSWORD)
    shutil.chown(root, "postgres")
    shutil.chown(pwfile, "postgres")
    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    subprocess.run([*as_pg, _pg_bin("initdb"), "-D", str(data), "-U", "harness", "--auth=scram-sha-256",
                    f"--pwfile={pwfile}"], check=True, capture_output=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([*as_pg, _pg_bin("pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                    f"-p {port} -k {root} -h 127.0.0.1", "start"], check=True, capture_output=True)
    env = dict(os.environ, PGPASSWORD=PG_PASSWORD)
    subprocess.run([_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "harness", "studies"],
                   check=True, capture_output=True, env=env)
    yield f"postgresql://harness:{PG_PASSWORD}@127.0.0.1:{port}/studies"
    subprocess.run([*as_pg, _pg_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
    shutil.rmtree(root, ignore_errors=True)
