"""Hamming-space indexes over packed binary codes.

One interface (:class:`BinaryIndex`), several backends registered in :data:`INDEXES`:

* ``flat`` — exact brute force;
* ``mih`` — exact multi-index hashing, sub-linear when neighbours are near;
* ``faiss`` — faiss-cpu binary indexes (flat exact; hash / multi-hash approximate);
* ``milvus`` — Milvus / Milvus Lite through pymilvus (optional extra).

:class:`HashIndex` adds item metadata in SQLite (attribute filters, image paths) on top of
a backend. Files are checksummed and written atomically (:mod:`.persist`).
"""
from . import faiss_index as _faiss_index  # noqa: F401  (registers "faiss")
from . import flat as _flat  # noqa: F401  (registers "flat")
from . import mih as _mih  # noqa: F401  (registers "mih")
from . import milvus_index as _milvus_index  # noqa: F401  (registers "milvus")
from ._kernel import PAD_DISTANCE, kernel_name, use_kernel
from .base import INDEXES, BinaryIndex, LocalIndex, open_index
from .catalogue import HashIndex
from .faiss_index import FaissIndex
from .flat import FlatIndex
from .mih import MIHIndex
from .milvus_index import MilvusIndex
from .persist import IndexFormatError

__all__ = [
    "INDEXES",
    "PAD_DISTANCE",
    "BinaryIndex",
    "FaissIndex",
    "FlatIndex",
    "HashIndex",
    "IndexFormatError",
    "LocalIndex",
    "MIHIndex",
    "MilvusIndex",
    "kernel_name",
    "open_index",
    "use_kernel",
]
