"""A storage URL's password, kept out of what a scheduler stores and shows.

A batch script, a job's name and a manifest are read by many (``scontrol show job``, the
scheduler's state files, ``kubectl get -o yaml``), so what they carry is the storage URL without
its password (:func:`split`). The password reaches the tasks another way:

- **Slurm**: a libpq password file (``PGPASSFILE``: ``host:port:database:user:password``), mode
  0600 in a folder only the user can enter (:func:`write_pgpass`); psycopg reads it when the URL
  holds no password. A home folder is shared by a cluster's nodes, so the tasks find it there.
- **Kubernetes**: a Secret, read into ``PGPASSWORD`` by the pod (``secretKeyRef``).

A user whose environment already holds ``PGPASSWORD``, or whose ``~/.pgpass`` already has the
entry, gives a URL without a password and nothing is written.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from harness import env
from harness.errors import HarnessError
from harness.sweep.storage import journal_path, redact

# Query keys that carry a password (libpq's ``password``; SQLAlchemy passes the query to the driver).
_PASSWORD_KEYS = re.compile(r"^(password|passwd|pass)$", re.IGNORECASE)


@dataclass(frozen=True)
class Storage:
    """A storage URL split in two: ``url`` is safe to write anywhere; ``password`` is not."""

    url: str
    password: str | None
    host: str
    port: int
    database: str
    user: str


def split(url: str) -> Storage:
    """``url`` without its password (in the user info or a ``?password=`` query), and the parts
    a password file names. Only storages that tasks on other hosts can share are accepted:
    PostgreSQL (or MySQL without a password in the URL), or a journal file on a shared filesystem."""
    from sqlalchemy.engine import URL, make_url

    if journal_path(url) is not None:
        return Storage(url, None, "", 0, "", "")
    if url.startswith("sqlite"):
        raise HarnessError("a cluster's tasks share one study: give --storage postgresql://user@host/db "
                           "(or journal:///shared/path.log on a filesystem every node mounts); SQLite is one host's")
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - ArgumentError, ValueError
        raise HarnessError(f"--storage {redact(url)}: not a database URL") from None
    query_password = next((v for k, v in parsed.query.items() if _PASSWORD_KEYS.match(k)), None)
    if isinstance(query_password, tuple):
        query_password = query_password[-1]
    password = parsed.password if parsed.password is not None else query_password
    # URL.create, not URL.set: set() leaves a field given as None unchanged.
    public = URL.create(parsed.drivername, username=parsed.username, host=parsed.host, port=parsed.port,
                        database=parsed.database,
                        query={k: v for k, v in parsed.query.items() if not _PASSWORD_KEYS.match(k)})
    if password is not None and not parsed.drivername.startswith("postgresql"):
        raise HarnessError(f"--storage {redact(url)}: only a PostgreSQL password can be handed to the tasks "
                           "(through a password file); give the URL without it and let the driver find it "
                           "(e.g. MySQL's ~/.my.cnf)")
    return Storage(public.render_as_string(hide_password=False), password, parsed.host or "localhost",
                   parsed.port or 5432, parsed.database or "*", parsed.username or "*")


def secrets_dir() -> Path:
    """Where password files go: ``$HARNESS_SECRETS``, default ``~/.harness/secrets`` (mode 0700)."""
    return Path(os.environ.get(env.SECRETS) or Path.home() / ".harness" / "secrets")


def _field(value: str | int) -> str:
    # libpq's escapes in a password file: a backslash before ":" and "\".
    return str(value).replace("\\", "\\\\").replace(":", "\\:")


def pgpass_path(study: str) -> Path:
    return secrets_dir() / f"{study}.pgpass"


def write_pgpass(study: str, storage: Storage) -> Path:
    """The study's password file, readable by the user alone (libpq ignores a file others can
    read); its path, which is all a batch script names."""
    assert storage.password is not None
    folder = secrets_dir()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    folder.chmod(0o700)
    path = pgpass_path(study)
    line = ":".join(_field(v) for v in (storage.host, storage.port, storage.database, storage.user,
                                         storage.password))
    # Created 0600 before anything is written: never readable by others, not even for a moment.
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(line + "\n")
    os.replace(tmp, path)
    return path
