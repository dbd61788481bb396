"""Durable file writes shared by the index, the batch encoder, the ONNX export and the int8
quantizer: a file appears whole (temporary file, rename) or not at all, so a killed process
never leaves a half-written one behind and concurrent processes never read half a file."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not supported everywhere (e.g. Windows)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_via_temp(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """``write(tmp)`` into a temporary file beside ``path`` (``.<name>.*.tmp``), flushed to
    disk, then renamed to ``path``; ``path``. For writers that take a file name (ONNX export,
    quantization, ``torch.save``); :func:`atomic_write` for bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(path.parent)
    return path


def atomic_write(path: str | os.PathLike, chunks) -> None:
    """Write an iterable of bytes-like ``chunks`` to ``path`` atomically and durably."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)

    write_via_temp(path, write)
