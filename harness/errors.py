"""Errors a user can act on. The CLI prints their message as one line, with no stack trace."""


class HarnessError(Exception):
    """Base class: the message names the file, row or key and says what to do."""


class SweepFileError(HarnessError):
    """A sweep file that cannot be read or does not validate."""


class DataError(HarnessError):
    """A dataset that cannot be read or is unusable."""


class TrialsCannotRun(HarnessError):
    """Trials die before training even after their retries (a broken install, a model that will
    not load): the study stops, and the CLI exits 1."""
