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
