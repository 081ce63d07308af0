"""Errors a user can act on. The CLI prints their message as one line, with no stack trace."""


class HarnessError(Exception):
    """Base class: the message names the file, row or key and says what to do."""


class SweepFileError(HarnessError):
    """A sweep file that cannot be read or does not validate."""


class DataError(HarnessError):
    """A dataset that cannot be read or is unusable."""
