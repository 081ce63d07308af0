import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# No hub, no W&B server, no telemetry: everything the tests touch is local.
os.environ.update(HF_HUB_OFFLINE="1", UNSLOTH_DISABLE_STATISTICS="1", WANDB_MODE="offline",
                  TOKENIZERS_PARALLELISM="false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Several test processes share the cores: torch's threads in each would wait on one another.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def harness_cache(tmp_path_factory):
    """A fresh cache per test session (the embedded model and corpus are built on first use), and
    one resident worker on it (``harness warm up``: fork mode, the CPU default) that every study of
    the session borrows when it is idle: importing unsloth costs ~15 s on two cores, and studies
    are many. Studies are the same with or without it: each trial is a fresh fork either way."""
    path = tmp_path_factory.mktemp("harness-cache")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Tests in several processes (pytest-xdist): each has its own cache and resident worker,
        # and they share what is built (the base's pretraining is minutes), one build at a time
        # per model (harness/worker/prepare.py locks it).
        shared = tmp_path_factory.getbasetemp().parent / "shared-cache"
        for name in ("models", "tokens", "corpus"):
            (shared / name).mkdir(parents=True, exist_ok=True)
            (path / name).symlink_to(shared / name)
    os.environ["HARNESS_CACHE"] = str(path)
    up = run_cli("warm", "up", "--timeout", "300")
    assert up.returncode == 0, up.stdout + up.stderr
    yield path
    run_cli("warm", "down")


@pytest.fixture
def private_cache(harness_cache, tmp_path, monkeypatch) -> Path:
    """A cache of the test's own, so no resident worker serves its studies (resident workers are
    per cache), with the session's models, tokens and corpus linked in (nothing is built again)."""
    path = tmp_path / "cache"
    path.mkdir()
    for name in ("models", "tokens", "corpus"):
        (harness_cache / name).mkdir(exist_ok=True)
        (path / name).symlink_to(harness_cache / name)
    monkeypatch.setenv("HARNESS_CACHE", str(path))
    return path


def wait_for(predicate, timeout: float = 180, every: float = 0.3) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` seconds pass (False)."""
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(every)
    return False


# The demo's base for the tests: pretrained on a sixth of the demo's tokens, in sequences half as
# long, a quarter of the held-out share (its two evaluations cost as much as the training), the
# same recipe otherwise (held-out loss 10.43 -> 6.17 with the demo's share): minutes less in every
# test session; tests/test_demo_sweep.py asserts it still learns. The demo itself builds the full one.
TEST_BASE = {"tokens": 65_536, "seq_len": 64, "held_out": 0.005}


def shipped_sweep(name: str, folder: Path, **changes) -> Path:
    """``sweeps/<name>.yaml`` as a user has it, written into ``folder`` with ``changes``, and with
    the tests' base wherever it names the demo's pretrained one (and half its validation rows:
    validating 64 rows took as long as training between two milestones)."""
    import yaml

    sweep = yaml.safe_load((ROOT / "sweeps" / f"{name}.yaml").read_text())
    if sweep["model"]["name"] == "tiny-mistral-base":
        sweep["model"]["pretrain"] = TEST_BASE
        sweep["dataset"]["max_val_rows"] = min(sweep["dataset"].get("max_val_rows", 32), 32)
    sweep.update(changes)
    path = folder / f"{sweep['study']}.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def table_row(text: str, *cells: str) -> bool:
    """Whether a Markdown table in ``text`` has a row starting with ``cells`` (Polars pads them)."""
    import re

    pattern = r"^\|" + "".join(rf"\s*{re.escape(str(c))}\s*\|" for c in cells)
    return re.search(pattern, text, re.MULTILINE) is not None


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


class PostgresServer:
    """A real PostgreSQL server on a free loopback port, with a password: ``url`` to reach it,
    ``restart()`` to bounce it as an operator would (``pg_ctl restart -m fast``: every session is
    ended, the server is back a moment later on the same port)."""

    def __init__(self):
        import shutil
        import socket
        import tempfile

        # Not under pytest's tmp folder: that is private to root, and the server runs as postgres.
        self.root = Path(tempfile.mkdtemp(prefix="harness-pg-"))
        self.data, pwfile = self.root / "data", self.root / "pw"
        pwfile.write_text(PG_PASSWORD)
        shutil.chown(self.root, "postgres")
        shutil.chown(pwfile, "postgres")
        self.as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*self.as_pg, _pg_bin("initdb"), "-D", str(self.data), "-U", "harness",
                        "--auth=scram-sha-256", f"--pwfile={pwfile}"], check=True, capture_output=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._pg_ctl("start")
        env = dict(os.environ, PGPASSWORD=PG_PASSWORD)
        subprocess.run([_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "harness", "studies"],
                       check=True, capture_output=True, env=env)
        self.url = f"postgresql://harness:{PG_PASSWORD}@127.0.0.1:{self.port}/studies"

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run([*self.as_pg, _pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), "-w",
                        "-o", f"-p {self.port} -k {self.root} -h 127.0.0.1", *args], check=True, capture_output=True)

    def restart(self, down_s: float = 0) -> None:
        """``pg_ctl restart -m fast``; with ``down_s``, stopped that long before it starts again."""
        if not down_s:
            self._pg_ctl("-m", "fast", "restart")
            return
        self._pg_ctl("-m", "fast", "stop")
        time.sleep(down_s)
        self._pg_ctl("start")

    def stop(self) -> None:
        import shutil

        subprocess.run([*self.as_pg, _pg_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
    """One PostgreSQL server for this test session (see :class:`PostgresServer`)."""
    server = PostgresServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres):
    """The URL of this test session's PostgreSQL server, with its password."""
    return postgres.url
