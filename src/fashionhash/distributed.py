"""Several processes, possibly on several machines, with PyTorch's own engine: ``torchrun``
starts the processes and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`session` joins them
into a ``torch.distributed`` process group (gloo for CPU tensors, nccl for CUDA ones)
and leaves it again, also on errors. Without torchrun (or with one process) every helper
here is a no-op, so single-process code paths stay exactly as they were.

:func:`sharded_encoder` is how training spreads a global batch over the processes while
the losses still compare every pair of the global batch; see its docstring.
:func:`encode_folder_distributed` spreads batch encoding (:mod:`fashionhash.encoding`)
over them, one shard per process.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from fashionhash.encoding import EncodeReport, Sources
    from fashionhash.pipeline import PhaseFactory, Run

#: how long a process waits for the others at a collective. Long on purpose: rank 0 alone
#: validates and the first process of each machine alone fills its feature cache while the
#: others wait; torchrun stops every process as soon as one fails, so a crash never waits.
#: ``$FASHIONHASH_DIST_TIMEOUT`` (seconds) overrides it (the tests: a hang fails fast).
TIMEOUT = datetime.timedelta(hours=2)


def _timeout() -> datetime.timedelta:
    env = os.environ.get("FASHIONHASH_DIST_TIMEOUT")
    return datetime.timedelta(seconds=float(env)) if env else TIMEOUT


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: global ``rank`` of ``world`` processes, ``local_rank``
    of the ``local_world`` processes on this machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files, logs at INFO and draws progress bars."""
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """The first process of its machine (fills that machine's caches)."""
        return self.local_rank == 0


def env_info() -> DistInfo:
    """The process's place as torchrun describes it in the environment (one process
    without torchrun)."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", 1))
    rank = int(env.get("RANK", 0))
    return DistInfo(rank=rank, world=world, local_rank=int(env.get("LOCAL_RANK", rank)),
                    local_world=int(env.get("LOCAL_WORLD_SIZE", world)))


def backend_for(device: torch.device) -> str:
    """The collective backend for tensors on ``device``: nccl for CUDA, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def session(device: torch.device = torch.device("cpu")) -> Iterator[DistInfo]:
    """Join the torchrun process group for the duration of the block, and leave it
    (``destroy_process_group``) at the end or on an error. A process group that the caller
    initialised already is used as it is and left to the caller."""
    if dist.is_available() and dist.is_initialized():
        env = env_info()
        yield DistInfo(rank=dist.get_rank(), world=dist.get_world_size(),
                       local_rank=env.local_rank, local_world=env.local_world)
        return
    info = env_info()
    if info.world == 1:
        yield info
        return
    dist.init_process_group(backend_for(device), timeout=_timeout())
    try:
        yield info
        # every rank done with its collectives before any tears the group down (a rank
        # leaving early once aborted its peer's gloo threads)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait until every process gets here."""
    if info.world > 1:
        dist.barrier()


@contextlib.contextmanager
def main_first(info: DistInfo, *, local: bool = False) -> Iterator[None]:
    """Run the block on rank 0 (``local``: on the first process of each machine) before
    the others run it: for work whose result the first run leaves on disk (a split file,
    the feature cache) and the others then only read."""
    first = info.is_local_main if local else info.is_main
    if info.world > 1 and not first:
        dist.barrier()
    yield
    if info.world > 1 and first:
        dist.barrier()


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` (picklable) on every rank."""
    if info.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj: Any, info: DistInfo) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if info.world == 1:
        return [obj]
    out: list = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _unflat(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    for t, chunk in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(chunk.view_as(t))


@torch.no_grad()
def broadcast_tensors_(tensors: Sequence[torch.Tensor], info: DistInfo) -> None:
    """Overwrite ``tensors`` (same shapes on every rank, one dtype) with rank 0's, in one message."""
    if info.world == 1 or not tensors:
        return
    flat = _flat(tensors)
    dist.broadcast(flat, src=0)
    _unflat(flat, tensors)


@torch.no_grad()
def all_reduce_mean_(tensors: Sequence[torch.Tensor], info: DistInfo) -> None:
    """Replace ``tensors`` (one dtype) by their mean over the ranks, in one message."""
    if info.world == 1 or not tensors:
        return
    flat = _flat(tensors)
    dist.all_reduce(flat)
    flat /= info.world
    _unflat(flat, tensors)


def all_gather_rows(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Every rank's ``t`` (same shape), concatenated along the first axis in rank order
    (no gradient)."""
    if info.world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(info.world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _gather_blocks(local: torch.Tensor, info: DistInfo, rows: int) -> torch.Tensor:
    """``(k * rows, ...)`` on every rank -> ``(k * world * rows, ...)`` whose block ``j`` is
    block ``j`` of every rank in rank order, with autograd: the backward sums the gradient
    that every rank's loss sends to this rank's rows."""
    parts = funcol.all_gather_single(local.contiguous(), 0, dist.group.WORLD)  # rank after rank
    k, rest = local.shape[0] // rows, local.shape[1:]
    return parts.reshape(info.world, k, rows, *rest).transpose(0, 1).reshape(-1, *rest)


def _own_blocks(full: torch.Tensor, info: DistInfo, rows: int) -> torch.Tensor:
    """Inverse of :func:`_gather_blocks` for this rank: its ``(k * rows, ...)`` rows."""
    rest = full.shape[1:]
    return full.reshape(-1, info.world, rows, *rest)[:, info.rank].reshape(-1, *rest)


def _check_rows(n: int, rows: int, what: str) -> None:
    if n % rows:
        raise RuntimeError(f"{what} got {n} rows, not a multiple of {rows}: the sharded encoder "
                           "expects it to run on the whole (stacked) batch")


@contextlib.contextmanager
def sharded_encoder(method: nn.Module, info: DistInfo, local_batch: int, *, local_inputs: bool,
                    seed: int) -> Iterator[None]:
    """While active, ``method.objectives(batch)`` sees the *global* batch, as one process
    would, but each rank runs the per-item encoder only on its own share of it.

    A global batch of ``B = world * local_batch`` items is laid out rank by rank: rank ``r``
    owns items ``r * local_batch ... (r + 1) * local_batch - 1`` (and the same rows of each
    stacked copy, e.g. the augmented views after the originals). ``batch["y"]``,
    ``["item"]`` and ``["attrs"]`` must hold the global batch; ``batch["x"]`` and
    ``["x_view"]`` hold the rank's own items (``local_inputs``, finetune: the backbone,
    by far the dearest part, runs on them and its features are all-gathered) or the global
    batch (frozen mode: every rank holds the cached features anyway). The hash head then runs
    on the rank's own rows only and its output is all-gathered too. Both gathers carry
    autograd (``all_gather_single``, which torch 2.13 recommends over the deprecated
    ``torch.distributed.nn.functional.all_gather``), so every rank computes the same
    losses on the whole batch, every pair included; the backward of a gather sums the
    gradients that all ranks' (identical) losses send to a rank's rows, so averaging the
    parameter gradients over the ranks afterwards gives exactly the one-process gradient.

    Randomness inside the sharded parts (dropout, stochastic depth) draws from a private
    stream seeded by ``seed`` (differ it per rank and step), so ranks do not repeat each
    other's dropout masks and the global stream, which the replicated loss code may draw
    from (random pair partners), stays the same on every rank.

    Caveat: batch normalisation inside a sharded backbone normalises over the rank's own
    items (CPU has no ``SyncBatchNorm``), as with ``DistributedDataParallel``.
    """
    rng_state = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def private_rng() -> Iterator[None]:
        nonlocal rng_state
        saved = torch.get_rng_state()
        torch.set_rng_state(rng_state)
        try:
            yield
        finally:
            rng_state = torch.get_rng_state()
            torch.set_rng_state(saved)

    global_rows = local_batch * info.world
    original_features, head = method.features, method.head
    original_forward = head.forward

    def features(x: torch.Tensor) -> torch.Tensor:
        _check_rows(len(x), local_batch, f"{type(method).__name__}.features")
        with private_rng():
            local = original_features(x)
        return _gather_blocks(local, info, local_batch)

    def head_forward(x: torch.Tensor) -> torch.Tensor:
        _check_rows(len(x), global_rows, f"{type(method).__name__}.head")
        with private_rng():
            local = original_forward(_own_blocks(x, info, local_batch))
        return _gather_blocks(local, info, local_batch)

    # instance attributes shadow the class's methods for the duration of one step only
    if local_inputs:
        method.features = features
    head.forward = head_forward
    try:
        yield
    finally:
        del head.forward
        if local_inputs:
            del method.features


def encode_folder_distributed(run: "Run", sources: "Sources", out_dir: str | os.PathLike, *,
                              shard: tuple[int, int] = (0, 1), progress: "PhaseFactory | None" = None,
                              **options: Any) -> "EncodeReport | None":
    """:func:`fashionhash.encoding.encode_folder` spread over the torchrun processes: rank
    ``r`` of ``w`` encodes shard ``(r, w)`` into ``out_dir`` (on a filesystem that every
    machine sees), then every rank waits until all shards are done. Returns, on rank 0, the
    report of the whole encoding (counts summed over the shards, ``complete``) and None on
    the other ranks, whose part is done. ``progress`` is used on rank 0 only (a bar for its
    own shard). Without torchrun this is ``encode_folder(..., shard=shard)``: the whole folder,
    or one shard started by hand. ``options`` go to ``encode_folder``.
    """
    from fashionhash.encoding import encode_folder

    with session() as info:
        if info.world == 1:
            return encode_folder(run, sources, out_dir, shard=shard, progress=progress, **options)
        if tuple(shard) != (0, 1):
            raise ValueError(f"under torchrun each process encodes the shard of its rank: do not also "
                             f"pass a shard ({shard[0]}/{shard[1]})")
        with main_first(info, local=True):  # one ONNX export per machine; the others load it
            run.encoder(options.get("engine"))
        report = encode_folder(run, sources, out_dir, shard=(info.rank, info.world),
                               progress=progress if info.is_main else None, **options)
        reports = all_gather_objects(report, info)  # returns once every shard has finished
    if not info.is_main:
        return None
    # every shard returned, so each of its chunks is on disk: the encoding is complete
    return dataclasses.replace(
        report, shard=(0, 1), resumed_chunks=sum(r.resumed_chunks for r in reports),
        written_chunks=sum(r.written_chunks for r in reports), encoded=sum(r.encoded for r in reports),
        unreadable=sum(r.unreadable for r in reports), seconds=max(r.seconds for r in reports),
        complete=True)
