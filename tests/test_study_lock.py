"""``study_lock`` beside a SQLite file or a journal: the lock file it takes, held exclusively."""

import threading

import filelock
import pytest

from harness.sweep.storage import study_lock


@pytest.mark.parametrize("url, name", [("sqlite:///{d}/study.db", "study.db.lock"),
                                       ("journal:///{d}/study.log", "study.log.ask.lock")])
def test_study_lock_is_exclusive_and_released(tmp_path, url, name):
    url, lock_file = url.format(d=tmp_path), tmp_path / name
    with study_lock(url):
        assert lock_file.exists()
        with pytest.raises(filelock.Timeout):
            filelock.FileLock(lock_file, timeout=0).acquire()
        # Another thread of the same process is kept out too (the driver runs one per slot).
        outcome: list[str] = []
        worker = threading.Thread(target=lambda: outcome.append(_try(lock_file)))
        worker.start()
        worker.join()
        assert outcome == ["busy"]
    assert _try(lock_file) == "taken"
    assert not (tmp_path / "study.log.lock").exists()  # Optuna's own journal lock is left alone


def _try(lock_file) -> str:
    try:
        with filelock.FileLock(lock_file, timeout=0):
            return "taken"
    except filelock.Timeout:
        return "busy"
