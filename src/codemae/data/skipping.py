"""The ``data.on_error`` policy for unreadable samples, in one place.

``raise``: the first unreadable sample stops the run, its error naming the file.
``skip``: it is passed over (logged) and the next candidate is tried, up to
``MAX_CONSECUTIVE_SKIPS`` in a row, so batches keep their size and ranks stay in step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from codemae.errors import DataError

log = logging.getLogger(__name__)
MAX_CONSECUTIVE_SKIPS = 16  # with data.on_error=skip, this many bad samples in a row stop the run
T = TypeVar("T")


def retry_readable(attempt: Callable[[int], T], on_error: str, what: str,
                   limit: int = MAX_CONSECUTIVE_SKIPS) -> tuple[T, int]:
    """``attempt(k)`` for k = 0, 1, ... until one returns without a :class:`DataError`:
    its result and k, the number of candidates skipped. ``what`` names the candidates in the
    error raised after ``limit`` failures in a row."""
    last: DataError | None = None
    for skipped in range(limit):
        try:
            return attempt(skipped), skipped
        except DataError as err:
            if on_error == "raise":
                raise
            log.warning("skipped an unreadable sample (data.on_error=skip): %s", err)
            last = err
    raise DataError(f"{what}: {limit} unreadable samples in a row, the last: {last}")
