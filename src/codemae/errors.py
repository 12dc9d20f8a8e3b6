"""Errors that reach the user as one line and exit code 2 (bad input, not a bug)."""

from __future__ import annotations


class CodemaeError(Exception):
    """Base class for errors caused by the user's input (config, data, paths)."""

    exit_code = 2


class ConfigError(CodemaeError):
    """A config key is unknown or its value is invalid."""


class DataError(CodemaeError):
    """A data file or folder is missing, unreadable or inconsistent."""


class TrainingError(CodemaeError):
    """Training cannot continue (non-finite loss, unwritable run folder)."""


class Interrupted(CodemaeError):
    """The user stopped the run (Ctrl-C, SIGINT)."""

    exit_code = 130


def one_line(err: BaseException) -> str:
    """The user-facing message of ``err`` as one line.

    Exceptions raised in DataLoader workers come back with the worker's traceback
    in their message; the original message is its last line.
    """
    text = str(err).strip()
    last = text.splitlines()[-1] if text else type(err).__name__
    prefix = f"{type(err).__module__}.{type(err).__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last
