"""Atomic file output: a reader never sees a half-written file."""

from __future__ import annotations

import os
import tempfile


def write_atomically(path: str, data: bytes | str, make_directory: bool = False) -> None:
    """Writes `data` to a temporary file beside `path`, then renames it.

    The temporary file lives in the destination directory, so the rename
    stays on one file system and is atomic; on any error it is removed.

    Raises:
      FileNotFoundError: the destination directory does not exist (and
        `make_directory` is False).
    """
    directory = os.path.dirname(os.path.abspath(path))
    if make_directory:
        os.makedirs(directory, exist_ok=True)
    elif not os.path.isdir(directory):
        raise FileNotFoundError(f"output directory {directory!r} does not exist")
    handle, temporary = tempfile.mkstemp(
        dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp"
    )
    try:
        with os.fdopen(handle, "wb" if isinstance(data, bytes) else "w") as stream:
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(stream.fileno(), 0o666 & ~umask)  # mkstemp creates the file 0600
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
