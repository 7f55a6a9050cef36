"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def atomic_write_bytes(path: str | Path, data: bytes, mode: int | None = None) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, rename it over `path`.

    `mode` (e.g. 0o600 for a secret): the file's permissions from its creation on, so its
    bytes are never readable by others, not even for an instant.

    A SIGKILL at any instant leaves either the previous file or the complete new one: rename
    within one directory is atomic on POSIX, and the fsync before it makes sure the renamed
    file's bytes are on disk (else a power cut could leave a renamed but empty file).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    with os.fdopen(os.open(tmp, flags, 0o666 if mode is None else mode), "wb") as f:
        if mode is not None:
            os.fchmod(f.fileno(), mode)  # the file may have existed (a torn earlier write)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def whole_folder(target: str | Path) -> Iterator[Path]:
    """Build a folder that appears at `target` whole or not at all.

    Yields `<target>.partial` to write into; on success it is renamed to `target` (atomic on
    POSIX), on any error it is deleted and the error re-raised, so a failed command leaves
    neither a half-written `target` nor a `.partial` behind. `target` must not exist.
    """
    target = Path(target)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # a torn earlier attempt (SIGKILL)
    partial.mkdir()
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    os.replace(partial, target)
    _fsync_dir(target.parent)
