"""Storage URLs (and messages quoting them) as logs and results show them: no password, ever."""

import pytest

from harness.sweep.storage import redact

HIDDEN = [  # (url, as shown, the secret)
    ("postgresql://u:secret@h:5432/db", "postgresql://u:***@h:5432/db", "secret"),
    ("postgresql+psycopg://u:secret@h/db?sslmode=require", "postgresql+psycopg://u:***@h/db?sslmode=require", "secret"),
    ("postgresql://h/db?user=u&password=secret", "postgresql://h/db?user=u&password=***", "secret"),
    # SQLAlchemy renders the query sorted by key.
    ("mysql://u:secret@h/db?passwd=other&charset=utf8", "mysql://u:***@h/db?charset=utf8&passwd=***", "other"),
    ("postgresql://:secret@h/db", "postgresql://:***@h/db", "secret"),
    ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db", "ss"),
    ("postgresql://u:p@s/s@h/db", "postgresql://u:***@h/db", "s/s"),
    ("postgresql://user@server:secret@h/db", "postgresql://user@server:***@h/db", "secret"),
    ("postgresql://u:p%40secret@h/db", "postgresql://u:***@h/db", "secret"),
    ("postgresql://u:se/cr?et@h/db", "postgresql://u:***@h/db", "cr?et"),
    # SQLAlchemy cannot parse these (a port that is no number; a message quoting the URL).
    ("postgresql://u:secret@h:notaport/db", "postgresql://u:***@h:notaport/db", "secret"),
    ("cannot open postgresql://u:secret@h/db: refused", "cannot open postgresql://u:***@h/db: refused", "secret"),
]


@pytest.mark.parametrize("url, shown, secret", HIDDEN)
def test_passwords_are_hidden(url, shown, secret):
    assert redact(url) == shown
    assert secret not in redact(url)


@pytest.mark.parametrize("url", [
    "sqlite:////abs/path with spaces/study.db", "sqlite:///rel%20x@y:z.db", "sqlite:////a@b/c@d.db",
    "journal:///shared/study.log", "journal:rel.log", "postgresql://u@h/db", "postgresql://h/db",
    "not a url", "https://sqlalche.me/e/20/e3q8",
])
def test_urls_without_a_password_are_unchanged(url):
    assert redact(url) == url
