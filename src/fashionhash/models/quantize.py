"""The ``onnx_int8`` engine: an EfficientNet-Lite backbone's convolutions in int8.

Static quantization (ONNX Runtime, QDQ format): int8 weights per output channel, uint8
activations whose ranges (min/max) are measured on a fixed set of calibration photos. On this
project's CPU (AVX-512 VNNI) a 224-px Lite0 pass is ~2.5x faster than fp32 for a feature
cosine of ~0.99 (benchmarks/results/int8.md). EfficientNet-Lite was made for this: ReLU6
and no squeeze-excite keep activation ranges narrow.

With ``float_tail = N > 0`` (``model.int8_float_tail``) the trunk's last ``N`` blocks and
its head conv stay float32 (ONNX Runtime's ``nodes_to_exclude``: every node from the first
one of block ``len(blocks) - N`` on): the second-stage descriptor's GeM of the last block
and of the head map is the output most sensitive to int8 error, and those layers run on
the smallest maps (7x7 at 224 px), so they cost little in float. Measured, they are not
where the error comes from (descriptor cosine to fp32 0.9934 -> 0.9936 at 224 px): it comes
from the first layers, on the largest maps. ``float_front = N > 0``
(``model.int8_float_front``) keeps the stem and blocks ``[:N]`` float32 (every node before
the first one of block ``N``): at ``N = 3`` the raw descriptor's cosine to fp32 is 0.9987
(min 0.996, against 0.967 all-int8) for a part of the speed-up (docs/results.md).

What is quantized is the *trunk*, photos ``(B, 3, S, S)`` -> ``(last block's output
(B, 320, h, w), head map (B, 1280, h, w))``; everything a model computes from those maps
(the average pool, a hash head, the GeM descriptors) stays float32 in a *tail* graph. The
trunk is quantized once per (backbone weights, input size, calibration photos) and the same
file serves every model built on it, so the catalogue's cached features and a run's query
encoder see the same int8 backbone, and the head reads the same pooled floats in both.

A model runs on this engine when it has ``embed_maps(blocks, head_map)`` (its output from
the two maps) and is, or holds as ``.backbone``, an EfficientNet-Lite.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from fashionhash.files import write_via_temp

from .features import export_onnx

log = logging.getLogger(__name__)

__all__ = ["INT8_VERSION", "Calibration", "int8_backbone", "float_tail_nodes", "float_front_nodes",
           "quantize_trunk", "int8_graph"]

#: part of every int8 file name and feature cache key: bump when the recipe changes
INT8_VERSION = 1
_CALIBRATION_BATCH = 8


@dataclass(frozen=True)
class Calibration:
    """The int8 recipe's inputs: the photos (encoded file bytes) whose activations set the
    int8 ranges, and ``float_tail``, the number of final blocks of the trunk kept float32
    with its head conv (0: every convolution in int8). ``tag``: a digest of both, which
    names the quantized files and the cached features (``float_tail=0`` keeps the tags
    that int8 files and caches had before the setting existed)."""

    photos: tuple[bytes, ...]
    float_tail: int = 0
    float_front: int = 0  # the stem and this many first blocks kept float32

    def __post_init__(self) -> None:
        if self.float_tail < 0 or self.float_front < 0:
            raise ValueError(f"float_tail={self.float_tail}, float_front={self.float_front}: numbers of "
                             "blocks kept float, >= 0")

    @functools.cached_property  # a frozen dataclass still has a __dict__ for it
    def tag(self) -> str:
        h = hashlib.sha256(f"int8-v{INT8_VERSION}".encode())
        for p in self.photos:
            h.update(hashlib.sha256(p).digest())
        if self.float_tail:
            h.update(f"float_tail={self.float_tail}".encode())
        if self.float_front:
            h.update(f"float_front={self.float_front}".encode())
        return h.hexdigest()[:16]

    @classmethod
    def from_files(cls, paths: Sequence[str | os.PathLike], float_tail: int = 0,
                   float_front: int = 0) -> "Calibration":
        return cls(tuple(Path(p).read_bytes() for p in paths), float_tail, float_front)


def int8_backbone(model: nn.Module) -> nn.Module:
    """The EfficientNet-Lite inside ``model`` (``model`` itself or ``model.backbone``);
    ValueError when ``model`` cannot run on the int8 engine."""
    backbone = model if hasattr(model, "forward_blocks") else getattr(model, "backbone", None)
    needs = ("forward_blocks", "forward_head", "_blocks")
    if backbone is None or not all(hasattr(backbone, a) for a in needs) or not hasattr(model, "embed_maps"):
        raise ValueError(f"engine onnx_int8 needs a frozen EfficientNet-Lite backbone (model.mode=frozen, "
                         f"no small_cnn); {type(model).__name__} has none: use engine onnx or torch")
    return backbone


class _Trunk(nn.Module):
    """Photos ``(B, 3, S, S)`` -> ``(blocks (B, C, h, w), head map (B, F, h, w))``."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.feat_dim = int(backbone.feat_dim)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.backbone
        blocks = b.forward_blocks(x)
        return blocks, b.forward_head(blocks, len(b._blocks))


class _Tail(nn.Module):
    """``model.embed_maps`` as a module, for the ONNX exporter."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, blocks: torch.Tensor, head_map: torch.Tensor) -> torch.Tensor:
        return self.model.embed_maps(blocks, head_map)


class _DropRootRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """The quantizer logs a line per rescaled bias and advice on the root logger: drop
    those while it runs (a filter on a logger sees only records logged on it, so this
    process's own loggers are untouched)."""
    root, drop = logging.getLogger(), _DropRootRecords()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _digest(*parts: str) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:16]


def _names_and_first_of_block(graph: Any, block: int) -> tuple[list[str], int]:
    """The node names of the exported trunk ``graph`` (topological order) and the index of
    the first node of block ``block``; ValueError when no node of that block is found."""
    marker = f"_blocks.{block}/"
    names = [n.name for n in graph.node]
    first = next((i for i, n in enumerate(names) if marker in n), None)
    if first is None:
        raise ValueError(f"no node of block {block} ({marker!r}) in the exported trunk")
    return names, first


def float_tail_nodes(graph: Any, n_blocks: int, float_tail: int) -> list[str]:
    """Names of the nodes of the exported trunk ``graph`` (an ``onnx.GraphProto``, nodes in
    topological order) that ``float_tail`` keeps float32: every node from the first one of
    block ``n_blocks - float_tail`` on (those blocks, the head conv and its ReLU6); none for
    0. ValueError when that block is not found (or ``float_tail > n_blocks``)."""
    if float_tail == 0:
        return []
    if not 0 < float_tail <= n_blocks:
        raise ValueError(f"int8 float_tail={float_tail}: the trunk has {n_blocks} blocks")
    names, first = _names_and_first_of_block(graph, n_blocks - float_tail)
    return names[first:]


def float_front_nodes(graph: Any, n_blocks: int, float_front: int) -> list[str]:
    """Names of the nodes of the exported trunk ``graph`` that ``float_front`` keeps float32:
    every node before the first one of block ``float_front`` (the stem and blocks
    ``[:float_front]``); none for 0. ValueError when that block is not found."""
    if float_front == 0:
        return []
    if not 0 < float_front < n_blocks:
        raise ValueError(f"int8 float_front={float_front}: the trunk has {n_blocks} blocks (keep < {n_blocks})")
    names, first = _names_and_first_of_block(graph, float_front)
    return names[:first]


def quantize_trunk(backbone: nn.Module, name: str, image_size: int, channels: int,
                   calibration: np.ndarray, tag: str, float_tail: int = 0, float_front: int = 0) -> Path:
    """The int8 trunk of ``backbone`` at ``image_size`` (ONNX, cached in
    ``$FASHIONHASH_CACHE/onnx/``), calibrated on the normalised photos ``calibration``
    float32 ``(n, C, S, S)`` whose identity is ``tag`` (which must tell ``float_tail``
    apart: :attr:`Calibration.tag` does), its last ``float_tail`` blocks and head conv, and
    its stem and first ``float_front`` blocks, left float32. Same inputs -> same file bytes."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    fp32 = export_onnx(_Trunk(backbone), f"{name}-trunk", image_size, channels,
                       output_names=("blocks", "head_map"))
    folder = fp32.parent
    path = folder / f"{name}-{image_size}px-{channels}ch-int8trunk-{_digest(fp32.stem, tag, str(INT8_VERSION))}.onnx"
    if path.is_file():
        os.utime(path)  # recently used: pruning keeps it
        return path

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(range(0, len(calibration), _CALIBRATION_BATCH))

        def get_next(self) -> dict | None:
            i = next(self.batches, None)
            return None if i is None else {"input": calibration[i:i + _CALIBRATION_BATCH]}

    import onnx

    graph = onnx.load(str(fp32)).graph
    exclude = (float_front_nodes(graph, len(backbone._blocks), float_front)
               + float_tail_nodes(graph, len(backbone._blocks), float_tail))

    def write(tmp: str) -> None:
        # per-channel int8 weights, uint8 activations, min/max ranges: deterministic, and the
        # recipe the AVX-512 VNNI kernels run fastest
        with _quiet_root_logger():
            quantize_static(str(fp32), tmp, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=exclude)

    write_via_temp(path, write)
    log.info("quantized %s at %dpx to int8 on %d calibration photos (float32: stem and first %d blocks "
             "if > 0, last %d blocks and head conv): %s", name, image_size, len(calibration), float_front,
             float_tail, path)
    return path


def _export_tail(model: nn.Module, blocks_shape: tuple[int, ...], head_shape: tuple[int, ...],
                 path: str) -> None:
    """``model.embed_maps`` -> ONNX at ``path`` (inputs ``blocks``, ``head_map``; output
    ``features``; dynamic batch), checked against PyTorch."""
    import onnxruntime as ort

    tail = _Tail(model).eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    # ReLU6-range inputs: the head map is non-negative, GeM needs that
    maps = (torch.rand(2, *blocks_shape[1:], generator=gen) * 6, torch.rand(2, *head_shape[1:], generator=gen) * 6)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(tail, tuple(m.to(device) for m in maps), path, dynamo=False,
                          input_names=["blocks", "head_map"], output_names=["features"],
                          dynamic_axes={"blocks": {0: "batch"}, "head_map": {0: "batch"}, "features": {0: "batch"}},
                          opset_version=17, do_constant_folding=True)
        ref = tail(*(m.to(device) for m in maps)).cpu().numpy()
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {i.name: maps[("blocks", "head_map").index(i.name)].numpy() for i in sess.get_inputs()}
    err = float(np.abs(sess.run(None, feeds)[0] - ref).max())
    if err > 1e-3:
        raise RuntimeError(f"ONNX export of {type(model).__name__}'s tail differs from PyTorch by {err:.3g}")


def _merge(trunk_path: Path, tail_path: str, out: str) -> None:
    """int8 trunk then float tail as one graph ``input -> features``."""
    import onnx
    from onnx import compose

    trunk, tail = onnx.load(str(trunk_path)), onnx.load(tail_path)
    ir = max(trunk.ir_version, tail.ir_version)
    trunk.ir_version = tail.ir_version = ir
    used = {i.name for i in tail.graph.input}
    io_map = [(n, n) for n in ("blocks", "head_map") if n in used]
    merged = compose.merge_models(trunk, tail, io_map=io_map, prefix2="tail/",
                                  outputs=["tail/features"])
    onnx.checker.check_model(merged)
    onnx.save(merged, out)


def int8_graph(model: nn.Module, name: str, image_size: int, channels: int,
               calibration: np.ndarray, tag: str, float_tail: int = 0, float_front: int = 0) -> Path:
    """ONNX graph ``input (B, C, S, S) -> features (B, model.feat_dim)``: the int8 trunk of
    ``model``'s backbone (see :func:`quantize_trunk`) then ``model.embed_maps`` in float32.
    Cached by the trunk's file and ``model``'s weights and code."""
    from .features import model_digest

    backbone = int8_backbone(model)
    if getattr(model, "training", False) or backbone.training:
        raise ValueError("int8_graph needs a model in eval mode")
    trunk = quantize_trunk(backbone, name, image_size, channels, calibration, tag, float_tail, float_front)
    folder = trunk.parent
    path = folder / f"{name}-{image_size}px-{channels}ch-int8-{_digest(trunk.stem, model_digest(model))}.onnx"
    if path.is_file():
        os.utime(path)
        return path
    with torch.inference_mode():
        blocks, head = _Trunk(backbone).embed(torch.zeros(1, channels, image_size, image_size,
                                                          device=next(model.parameters()).device))
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        tail = os.path.join(tmp, "tail.onnx")
        _export_tail(model, tuple(blocks.shape), tuple(head.shape), tail)
        write_via_temp(path, lambda out: _merge(trunk, tail, out))
    log.info("int8 graph of %s at %dpx: %s", type(model).__name__, image_size, path)
    return path
