"""Atomic file output: a result appears under its final name only when it is complete."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from model.errors import UserError


def check_writable(path: Path, overwrite: bool) -> None:
    """Refuse an output that cannot be written, before any work is spent on it."""
    directory = path.parent
    if not directory.is_dir():
        raise UserError(f"{path}: output directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise UserError(f"{path}: output directory {directory} is not writable")
    if path.exists() and not overwrite:
        raise UserError(f"{path}: file exists (use --overwrite to replace it)")


@contextlib.contextmanager
def atomic_path(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The temporary file lives in the destination directory so the final `os.replace` is atomic (same
    file system). On any error, including KeyboardInterrupt or a full disk, the temporary file is removed
    and a previous file at `path` is left untouched.
    """
    path = Path(path)
    check_writable(path, overwrite)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()  # writers such as GDAL want to create the file themselves
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"nothing was written to {tmp}")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
