"""Output files: a result appears under its final name only when complete, never over one of the run's inputs,
and only one run writes a given output at a time."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from core.errors import UserError


def check_writable(path: Path, overwrite: bool) -> None:
    """Refuse an output that cannot be written, before any work is spent on it."""
    directory = path.parent
    if not directory.is_dir():
        raise UserError(f"{path}: output directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise UserError(f"{path}: output directory {directory} is not writable")
    if path.is_dir():
        raise UserError(f"{path}: is a directory; give a file name for the output")
    if path.exists() and not overwrite:
        raise UserError(f"{path}: file exists (use --overwrite to replace it)")


def is_same_file(a: str | Path, b: str | Path) -> bool:
    """Do two paths name one file, whatever the spelling: `..`, symbolic links, hard links."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet), or is a GDAL virtual path such as /vsis3/...
        return False


def check_not_input(output: str | Path, inputs: Iterable[str | Path | None], role: str = "output") -> None:
    """Refuse an output (or work file, or a directory the run replaces) that is one of the user's inputs or
    holds one: with --overwrite it would be destroyed (a raster GeoPackage scene, `-o` naming the scene, a
    checkpoint or config reached through a link)."""
    inside = Path(os.path.realpath(output))
    for item in inputs:
        if item is None:
            continue
        if is_same_file(output, item):
            raise UserError(f"{output}: the {role} would overwrite the input {item}; choose another output path")
        if inside in Path(os.path.realpath(item)).parents:
            raise UserError(f"{output}: the {role} would replace a directory that holds the input {item}; "
                            "choose another output path")


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
        sync(tmp)  # the data is on disk before the name says the file is complete
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def remove_leftovers(path: str | Path) -> list[Path]:
    """Delete the temporary files an earlier run killed mid-write left beside `path` (`atomic_path`'s
    `.NAME.*.partial*`). Call it only while holding `path` (`exclusive`): no other run writes them then."""
    path = Path(path)
    found = [p for p in path.parent.glob(f".{glob_escape(path.name)}.*.partial*") if p.is_file()]
    for leftover in found:
        leftover.unlink(missing_ok=True)
    return found


def glob_escape(name: str) -> str:
    """A file name as a glob pattern matching only itself (`[`, `*`, `?` taken literally)."""
    return "".join(f"[{c}]" if c in "[]*?" else c for c in name)


def sync(path: Path) -> None:
    """Flush a written file to the disk (once per output, so writers may skip syncing as they go)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lock_path(path: str | Path) -> Path:
    """`.NAME.lock` beside the output it guards."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def exclusive(path: str | Path) -> Iterator[None]:
    """Hold the output at `path` for this process: a second run on it is refused with one line naming the
    holder, instead of both filling (and clearing) one tile store.

    The lock is an flock on `.NAME.lock` beside the output, which the kernel releases when its process ends
    however it ends, so a lock left by a killed run is taken over at once. The file records who holds it
    (pid, host, start, command) for the message; it is removed when the run ends.
    """
    lock = lock_path(path)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"{path}: cannot create the lock file {lock} ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise UserError(f"{path}: cannot lock {lock} ({exc.strerror})") from None
            raise UserError(f"{path}: another run is writing this output ({holder}); wait for it to end or "
                            "stop it") from None
        try:  # its previous holder may have removed the file between our open and our lock: lock anew
            current = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    holder = (f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
              f"{' '.join(sys.argv)[:300]}")
    os.ftruncate(fd, 0)
    os.write(fd, holder.encode())
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)  # while still held, so no other run can hold this very file
        os.close(fd)
