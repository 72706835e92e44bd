"""Writes a JSON report atomically, so a reader never sees a half-written file."""

from __future__ import annotations

import json
from typing import Any

from tfquant.fileio import write_atomically


def write_json_atomic(path: str, payload: Any) -> None:
    """Writes `payload` as indented JSON to `path` (directories are created).

    >>> write_json_atomic("bench.json", {"rows": []})  # doctest: +SKIP
    """
    write_atomically(path, json.dumps(payload, indent=2) + "\n", make_directory=True)
