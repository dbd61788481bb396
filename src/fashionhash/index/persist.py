"""Index file format: a checksummed container, written atomically.

Layout (little endian)::

    magic     8 bytes   b"FHASHIDX"
    version   uint32    FORMAT_VERSION
    meta_len  uint32    length of the JSON metadata
    data_len  uint64    length of the array payload
    sha256    32 bytes  SHA-256 of (metadata + payload)
    metadata  JSON      {"backend", "n_bits", ..., "arrays": [{name, dtype, shape, offset}]}
    payload   raw array bytes, C order

Readers check every field and the checksum before building anything, so a truncated,
padded or bit-flipped file raises :class:`IndexFormatError` instead of returning wrong
results. Writers go through a temporary file in the target directory, fsync it, then
``os.replace`` it over the target (and fsync the directory): a crash at any point leaves
either the old file or the new one, never a mix.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from fashionhash.files import atomic_write

MAGIC = b"FHASHIDX"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIIQ32s")
_MAX_META = 16 << 20


class IndexFormatError(ValueError):
    """An index file is truncated, corrupted, or not an index file at all."""


def write_container(path: str | os.PathLike, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Save ``meta`` (JSON-able) and named arrays to ``path`` in the container format."""
    descs, views, offset = [], [], 0
    for name, arr in arrays.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        descs.append({"name": name, "dtype": arr.dtype.str, "shape": list(arr.shape), "offset": offset})
        views.append(memoryview(arr).cast("B") if arr.size else b"")
        offset += arr.nbytes
    meta = dict(meta, arrays=descs)
    meta_bytes = json.dumps(meta, sort_keys=True).encode()
    digest = hashlib.sha256(meta_bytes)
    for v in views:
        digest.update(v)
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, len(meta_bytes), offset, digest.digest())
    atomic_write(path, [header, meta_bytes, *views])


def read_container(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Load and verify a container; raises :class:`IndexFormatError` on any inconsistency."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(_HEADER.size)
        if len(head) < _HEADER.size:
            raise IndexFormatError(f"{path}: truncated header ({len(head)} bytes)")
        magic, version, meta_len, data_len, checksum = _HEADER.unpack(head)
        if magic != MAGIC:
            raise IndexFormatError(f"{path}: not a fashionhash index file (bad magic {magic!r})")
        if version != FORMAT_VERSION:
            raise IndexFormatError(
                f"{path}: unsupported format version {version} (this build reads {FORMAT_VERSION})"
            )
        size = os.fstat(f.fileno()).st_size
        expected = _HEADER.size + meta_len + data_len
        if meta_len > _MAX_META or size != expected:
            what = "truncated" if size < expected else "has trailing bytes"
            raise IndexFormatError(f"{path}: file {what}: {size} bytes, header says {expected}")
        meta_bytes = f.read(meta_len)
        payload = bytearray(data_len)
        if f.readinto(payload) != data_len or len(meta_bytes) != meta_len:
            raise IndexFormatError(f"{path}: truncated while reading")
    digest = hashlib.sha256(meta_bytes)
    digest.update(payload)
    if digest.digest() != checksum:
        raise IndexFormatError(f"{path}: checksum mismatch, the file is corrupted")
    try:
        meta = json.loads(meta_bytes)
        arrays = {}
        for desc in meta.pop("arrays"):
            dtype = np.dtype(desc["dtype"])
            shape = tuple(int(s) for s in desc["shape"])
            start = int(desc["offset"])
            count = int(np.prod(shape, dtype=np.int64))
            if start < 0 or start + count * dtype.itemsize > data_len:
                raise IndexFormatError(f"{path}: array {desc['name']!r} lies outside the payload")
            arrays[desc["name"]] = np.frombuffer(payload, dtype=dtype, count=count, offset=start).reshape(shape)
    except IndexFormatError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise IndexFormatError(f"{path}: malformed metadata: {exc}") from exc
    return meta, arrays
