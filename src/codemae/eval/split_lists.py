"""Split-list files: one sample name per line; blank lines and lines starting with ``#`` are skipped."""

from __future__ import annotations

from pathlib import Path

from codemae.errors import DataError


def read_split_list(path: str | Path) -> list[str]:
    """The names in a split-list file, in file order."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise DataError(f"split list {path}: cannot be read ({err.strerror or err})") from None
    return [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]
