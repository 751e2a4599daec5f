"""Typed errors. Every error a person can cause carries one clear sentence.

The CLI prints ``str(error)`` of a :class:`PsctlError` and exits non-zero;
anything else is a bug and keeps its traceback.
"""


class PsctlError(Exception):
    """Base class: the message is one sentence meant for the person at the terminal."""

    exit_code = 1


class DataError(PsctlError):
    """An input data file is missing, empty or malformed."""

    exit_code = 2


class ModelFileError(PsctlError):
    """A model file is missing, damaged or not a psctl model of the expected kind."""

    exit_code = 2


class ConnectError(PsctlError):
    """A server could not be reached."""

    exit_code = 3


class JobError(PsctlError):
    """The job failed on the cluster (the message says where and why)."""

    exit_code = 4


class SecurityError(PsctlError):
    """A peer failed authentication, or a setting would expose the cluster."""

    exit_code = 5


class Interrupted(PsctlError):
    """The person stopped the command (Ctrl-C or SIGTERM); the message says what was kept."""

    exit_code = 130


class RequestError(Exception):
    """A request is refused: a service turns it into an ERROR reply (``code`` on the wire); the connection stays open.

    Pure code (tables, shard state, the coordinator core) raises it too: it names no transport."""

    def __init__(self, message: str, code: str = "bad_request"):
        super().__init__(message)
        self.code = code


class UsageError(PsctlError):
    """The command line asks for something impossible (a value out of range, options that
    contradict each other); refused before anything starts."""

    exit_code = 2
