"""Batch feature extraction with a backbone, overlapping JPEG decoding with the model.

``extract_features(images, "efficientnet_lite0", image_size=128)`` returns
``(features (N, feat_dim) float32, ok (N,) bool)``. Images that cannot be read get a zero
row and ``ok=False``; one summarising warning is logged instead of crashing the batch.

Pipeline: decode workers (threads by default, or processes) decode + resize + optionally
augment batches into uint8 ``(B, C, S, S)`` while the model runs on earlier batches; at
most ``2 * num_workers`` batches are decoded ahead so memory stays bounded for any N.
Threads are the default: Pillow releases the GIL while decoding and resizing, onnxruntime
while running, and on this 2-core machine a thread pool was as fast as a process pool
(benchmarks/results/bench_features.md) without pickling, start-up cost or the
``if __name__ == "__main__"`` requirement of non-fork process start methods.

Engines:

* ``"onnx"`` (default): the backbone's pooled-feature graph is exported once to
  ``$FASHIONHASH_CACHE/onnx/`` (default ``~/.cache/fashionhash/onnx/``), keyed by backbone,
  input size and a hash of the weights and model code, and run with onnxruntime on CPU.
* ``"torch"``: eager PyTorch (``inference_mode``); same numbers to ~1e-5.
* ``"onnx_int8"``: the EfficientNet-Lite backbone's convolutions statically quantized to
  int8 (calibrated on the photos given as ``calibration``), the pooling and whatever the
  model puts after it in float32; see :mod:`fashionhash.models.quantize`. Not the same
  numbers as fp32 (feature cosine ~0.99): caches and indexes keep the two apart.

torch / onnxruntime are imported lazily so that decode workers start fast.
"""
from __future__ import annotations

import concurrent.futures as cf
import functools
import hashlib
import inspect
import logging
import multiprocessing as mp
import os
import time
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Sequence, Union

import numpy as np
from PIL import Image

from fashionhash.data.transforms import ImageError, augment, load_image, resize_square, to_rgb
from fashionhash.files import write_via_temp

if TYPE_CHECKING:  # pragma: no cover
    import onnxruntime as ort
    from torch import nn

    from .quantize import Calibration

log = logging.getLogger(__name__)

__all__ = [
    "Engine",
    "ImageInput",
    "FeatureExtractor",
    "extract_features",
    "cache_dir",
    "export_onnx",
    "onnx_session",
]

Engine = Literal["onnx", "torch", "onnx_int8"]
ENGINES: tuple[str, ...] = ("onnx", "torch", "onnx_int8")
ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, bytes]

# Part of the ONNX cache key (with the weights and the model / exporter source files).
_EXPORT_VERSION = 1
_ONNX_OPSET = 17
# Every code or weight change names a new export (see model_digest): beyond the most
# recently used ones, exports unused for a week are deleted, so the cache does not grow with
# each upgrade. The age matters: a process may hold a path it has not opened yet.
ONNX_CACHE_KEEP = 8
ONNX_CACHE_MAX_AGE_S = 7 * 24 * 3600


# --------------------------------------------------------------------------- decoding

@dataclass(frozen=True)
class _PrepSpec:
    """Everything a decode worker needs (picklable, no torch)."""

    size: int
    channels: int
    mode: str
    augment_seed: int | None
    augment_strength: float


def _to_pil(item: ImageInput, index: int, draft_size: int | None) -> Image.Image:
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim not in (2, 3):
            raise ImageError(f"<array #{index}>", f"need uint8 HxW or HxWxC, got {item.dtype} {item.shape}")
        if item.ndim == 3 and item.shape[2] == 1:
            item = item[:, :, 0]
        return Image.fromarray(item)
    # JPEG draft mode decodes big photos straight to ~target size (1/2..1/8 DCT scaling).
    name = f"<bytes #{index}>" if isinstance(item, bytes) else None
    return load_image(item, draft_size=draft_size, name=name)


def _prepare_one(item: ImageInput, index: int, spec: _PrepSpec) -> np.ndarray:
    """One input -> uint8 ``(C, S, S)``; raises ImageError."""
    # Augmentation crops and rescales: decode at 2x so its crops keep enough detail.
    draft = spec.size * (2 if spec.augment_seed is not None else 1)
    img = _to_pil(item, index, draft)
    if spec.augment_seed is not None:
        # Seeded per image index: identical views whatever the batching / worker count.
        rng = np.random.default_rng([spec.augment_seed, index])
        img = augment(img, rng, spec.augment_strength)
    img = img.convert("L") if spec.channels == 1 else to_rgb(img)
    img = resize_square(img, spec.size, spec.mode)
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return arr


def _prepare_batch(
    items: Sequence[ImageInput], start: int, spec: _PrepSpec
) -> tuple[int, np.ndarray, np.ndarray, list[str]]:
    """Worker entry point: ``(start, uint8 (B, C, S, S), ok (B,), error messages)``."""
    out = np.full((len(items), spec.channels, spec.size, spec.size), 255, dtype=np.uint8)
    ok = np.zeros(len(items), dtype=bool)
    errors: list[str] = []
    for j, item in enumerate(items):
        try:
            out[j] = _prepare_one(item, start + j, spec)
            ok[j] = True
        except ImageError as e:
            errors.append(str(e))
        except Exception as e:  # noqa: BLE001 - one odd file must not kill a 40k-image run
            errors.append(f"{item if isinstance(item, (str, os.PathLike)) else f'#{start + j}'}: {e!r}")
    return start, out, ok, errors


# --------------------------------------------------------------------------- ONNX

def cache_dir() -> Path:
    """Root cache folder: ``$FASHIONHASH_CACHE`` or ``~/.cache/fashionhash``."""
    env = os.environ.get("FASHIONHASH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fashionhash"


def model_digest(model: "nn.Module") -> str:
    """Hash of weights (names, shapes, bytes) + model and exporter source + export version.

    Any edit to this module or to the code of any fashionhash module inside the model
    (backbone, hash head, a method's ``encode``) gives a new file name, so a cached graph
    can never be stale. A module's ``export_key`` attribute (a string) is hashed too, for
    what changes the graph but not the weights (the block where a partial front stops).
    """
    h = hashlib.sha256(f"v{_EXPORT_VERSION}/{type(model).__qualname__}".encode())
    sources = {inspect.getfile(type(m)) for m in model.modules()
               if type(m).__module__.split(".")[0] == "fashionhash"}
    # what the weights do not tell: e.g. the block where a backbone's front stops
    for m in model.modules():
        if getattr(m, "export_key", None):
            h.update(str(m.export_key).encode())
    for src in (*sorted(sources | {inspect.getfile(type(model))}), __file__):
        try:
            h.update(Path(src).read_bytes())
        except (TypeError, OSError):
            pass
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def export_onnx(
    model: "nn.Module",
    name: str,
    image_size: int,
    channels: int = 3,
    *,
    directory: str | os.PathLike | None = None,
    output_names: Sequence[str] = ("features",),
) -> Path:
    """Export ``model.embed`` (``(B, C, S, S) -> (B, feat_dim)``, dynamic B) to ONNX, once.

    ``output_names``: one name per output when ``embed`` returns a tuple of tensors (each
    with a dynamic first axis), e.g. the feature maps the int8 engine quantizes.

    Returns the cached file if one with the same name/size/weights hash exists. The file
    is written to a temp name and renamed so concurrent processes never see half a file.
    The export is checked against eager PyTorch (max abs diff 1e-3) before it is kept.
    """
    import torch

    folder = Path(directory) if directory is not None else cache_dir() / "onnx"
    path = folder / f"{name}-{image_size}px-{channels}ch-{model_digest(model)}.onnx"
    if path.is_file():
        try:
            os.utime(path)  # recently used: pruning keeps it
        except OSError:
            pass
        return path
    folder.mkdir(parents=True, exist_ok=True)

    class _Embed(torch.nn.Module):
        def __init__(self, inner: "nn.Module") -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: "torch.Tensor") -> Any:
            return self.inner.embed(x)

    # The exporter restores the *wrapper's* train/eval mode recursively afterwards, which
    # would flip BatchNorm into training: remember every module's mode and put it back.
    modes = {m: m.training for m in model.modules()}
    wrapper = _Embed(model).eval()
    device = next(model.parameters()).device
    dummy = torch.zeros(2, channels, image_size, image_size, device=device)
    def write(tmp: str) -> None:
        with warnings.catch_warnings():
            # Tracer warnings about the SAME-padding sizes are expected: the graph is
            # exported per input size, so those sizes are constants by design.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                (dummy,),
                tmp,
                dynamo=False,  # TorchScript exporter: no onnxscript dependency
                input_names=["input"],
                output_names=list(output_names),
                dynamic_axes={"input": {0: "batch"}, **{o: {0: "batch"} for o in output_names}},
                opset_version=_ONNX_OPSET,
                do_constant_folding=True,
            )
        _fold_pads_into_convs(tmp)
        x = torch.randn(2, channels, image_size, image_size, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            ref = wrapper(x.to(device))
        refs = ref if isinstance(ref, (tuple, list)) else (ref,)
        gots = _new_session(tmp, threads=1).run(None, {"input": x.numpy()})
        err = max(float(np.abs(g - r.cpu().numpy()).max()) for g, r in zip(gots, refs))
        if err > 1e-3:
            raise RuntimeError(f"ONNX export of {name} differs from PyTorch by {err:.3g}")

    try:
        write_via_temp(path, write)
    finally:
        for m, training in modes.items():
            m.training = training
    log.info("exported %s at %dpx to %s", name, image_size, path)
    prune_exports(folder, keep=ONNX_CACHE_KEEP)
    return path


def prune_exports(folder: str | os.PathLike, keep: int = ONNX_CACHE_KEEP,
                  max_age_s: float = ONNX_CACHE_MAX_AGE_S) -> list[Path]:
    """Delete the ``*.onnx`` files in ``folder`` that are neither among the ``keep`` most
    recently used nor used within ``max_age_s`` seconds.

    Returns the deleted paths. A file another process removed first is skipped.
    """
    files = []
    for p in Path(folder).glob("*.onnx"):
        try:
            files.append((p.stat().st_mtime, p))
        except OSError:
            pass  # removed meanwhile
    files.sort(reverse=True)
    gone = []
    now = time.time()
    for mtime, p in files[keep:]:
        if now - mtime < max_age_s:
            continue
        try:
            p.unlink()
            gone.append(p)
        except FileNotFoundError:
            pass
    if gone:
        log.info("deleted %d old ONNX export(s) from %s", len(gone), folder)
    return gone


def _fold_pads_into_convs(path: str) -> None:
    """Rewrite ``Pad(zeros) -> Conv`` as one ``Conv`` with asymmetric ``pads``, in place.

    The TF "SAME" padding of the strided convolutions exports as separate Pad nodes,
    which onnxruntime neither folds nor keeps in its blocked (NCHWc) layout: fusing them
    makes the Lite0 graph ~25% faster on CPU. ORT's basic level (hardware-independent)
    first constant-folds the pad amounts; anything unexpected leaves the node alone.
    """
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    folded = path + ".folded"
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = folded
    so.log_severity_level = 3  # ORT warnings would go to stderr, not to our logger
    ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    try:
        model = onnx.load(folded)
    finally:
        os.unlink(folded)
    graph = model.graph
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    users: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}

    def attr(node: Any, name: str, default: Any) -> Any:
        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    fused = []
    for pad in graph.node:
        if pad.op_type != "Pad" or attr(pad, "mode", b"constant") != b"constant":
            continue
        ins = list(pad.input) + [""] * (4 - len(pad.input))
        pads = consts.get(ins[1])
        if pads is None or pads.shape != (8,) or (pads < 0).any() or pads[[0, 1, 4, 5]].any():
            continue  # only non-negative H/W padding of a 4-D tensor
        if ins[2] and (ins[2] not in consts or consts[ins[2]].any()):
            continue  # non-zero fill value
        if ins[3] or pad.output[0] in graph_outputs:
            continue
        convs = users.get(pad.output[0], [])
        if len(convs) != 1 or convs[0].op_type != "Conv":
            continue
        conv = convs[0]
        if attr(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue
        old = list(attr(conv, "pads", [0, 0, 0, 0]))
        new = [old[0] + int(pads[2]), old[1] + int(pads[3]), old[2] + int(pads[6]), old[3] + int(pads[7])]
        for a in list(conv.attribute):
            if a.name == "pads":
                conv.attribute.remove(a)
        conv.attribute.append(helper.make_attribute("pads", new))
        conv.input[0] = pad.input[0]
        fused.append(pad)
    for node in fused:
        graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    log.debug("fused %d Pad nodes into Conv in %s", len(fused), path)


def _new_session(path: str | os.PathLike, threads: int | None) -> "ort.InferenceSession":
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads or os.cpu_count() or 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # Spinning worker threads would steal the CPU the decode workers need between runs.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@functools.lru_cache(maxsize=8)
def onnx_session(path: str, threads: int | None = None) -> "ort.InferenceSession":
    """Cached CPU onnxruntime session (``threads`` intra-op threads, default
    ``os.cpu_count()``). ``InferenceSession.run`` is thread-safe and releases the GIL."""
    return _new_session(path, threads)


# --------------------------------------------------------------------------- extractor

class FeatureExtractor:
    """Reusable extractor: builds the backbone (and ONNX sessions) once.

    ``FeatureExtractor("efficientnet_lite0", image_size=128)(paths)`` ->
    ``(features (N, 1280) float32, ok (N,) bool)``. Pass ``model`` to use trained /
    fine-tuned weights (any module with ``embed`` and ``feat_dim``) instead of the
    registry's default; the ONNX cache key includes the weights, so that is safe.

    ONNX threading (measured, see benchmarks/bench_features.py): for many batches it is
    cheaper to run ``parallel_batches`` (default ``os.cpu_count()``) batches at once, each
    on one thread, than one batch on all cores -- depthwise convolutions scale poorly
    across intra-op threads. A single batch (e.g. one query photo) uses a second
    session with ``threads`` (default ``os.cpu_count()``) intra-op threads for latency.

    ``channels_last`` (torch engine): convert ``model`` to channels-last memory format, in
    place (same values; faster convolutions on CPU, benchmarks/bench_encode.py).

    ``calibration`` (``onnx_int8`` engine, required there): the photos whose activations set
    the int8 ranges, decoded like the inputs (:class:`fashionhash.models.quantize.Calibration`).
    """

    def __init__(
        self,
        backbone_name: str,
        *,
        image_size: int | None = None,
        engine: Engine = "onnx",
        model: "nn.Module | None" = None,
        resize_mode: str = "letterbox",
        threads: int | None = None,
        parallel_batches: int | None = None,
        channels_last: bool = False,
        calibration: "Calibration | None" = None,
    ) -> None:
        from .backbones import build_backbone, preprocessing_for

        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        if engine == "onnx_int8" and calibration is None:
            raise ValueError("engine onnx_int8 needs calibration photos (calibration=Calibration(...))")
        prep = preprocessing_for(backbone_name)
        self.backbone_name = backbone_name
        self.engine: Engine = engine
        self.image_size = int(image_size or prep.size)
        self.channels = prep.channels
        self.resize_mode = resize_mode
        self.model = model if model is not None else build_backbone(backbone_name)
        self.feat_dim = int(self.model.feat_dim)
        cpus = os.cpu_count() or 1
        self.threads = int(threads or cpus)
        # The torch engine runs batches one at a time on torch's own intra-op threads
        # unless told otherwise (then set torch.set_num_threads(1): one core per batch).
        self.parallel_batches = int(parallel_batches or (1 if engine == "torch" else cpus))
        self.channels_last = bool(channels_last and engine == "torch")
        if self.channels_last:
            import torch

            self.model.to(memory_format=torch.channels_last)
        # Fold /255 and (x - mean) / std into one multiply-add on the uint8 batch.
        std = np.asarray(prep.std, dtype=np.float32)
        mean = np.asarray(prep.mean, dtype=np.float32)
        self._scale = (1.0 / (255.0 * std)).reshape(1, -1, 1, 1)
        self._shift = (mean / std).reshape(1, -1, 1, 1)
        self.onnx_path: Path | None = None
        if engine == "onnx":
            self.onnx_path = export_onnx(self.model, backbone_name, self.image_size, self.channels)
        elif engine == "onnx_int8":
            from .quantize import int8_graph

            assert calibration is not None
            self.onnx_path = int8_graph(self.model, backbone_name, self.image_size, self.channels,
                                        self.calibration_batch(calibration), calibration.tag,
                                        calibration.float_tail, calibration.float_front)

    def calibration_batch(self, calibration: "Calibration") -> np.ndarray:
        """The calibration photos decoded and normalised like every input: float32
        ``(n, C, S, S)`` (unreadable ones left out)."""
        spec = _PrepSpec(self.image_size, self.channels, self.resize_mode, None, 1.0)
        _, u8, ok, errors = _prepare_batch(list(calibration.photos), 0, spec)
        if not ok.any():
            raise ValueError(f"no readable calibration photo (first error: {errors[0] if errors else '-'})")
        return self.normalise(u8[ok])

    def normalise(self, batch_u8: np.ndarray) -> np.ndarray:
        """uint8 ``(B, C, S, S)`` -> normalised float32 ``(B, C, S, S)``."""
        return batch_u8.astype(np.float32) * self._scale - self._shift

    def embed_array(self, x: np.ndarray, *, single_thread: bool = False) -> np.ndarray:
        """Normalised float32 ``(B, C, S, S)`` -> features float32 ``(B, feat_dim)``.

        ``single_thread`` (ONNX only) uses the 1-thread session, for callers that run
        several batches concurrently; thread-safe either way.
        """
        if self.onnx_path is not None:
            sess = onnx_session(str(self.onnx_path), 1 if single_thread else self.threads)
            return sess.run(None, {"input": np.ascontiguousarray(x, dtype=np.float32)})[0]
        import torch

        was_training = self.model.training
        self.model.eval()
        try:
            device = next(self.model.parameters()).device
            with torch.inference_mode():
                xt = torch.from_numpy(np.ascontiguousarray(x)).to(device)
                if self.channels_last:
                    xt = xt.contiguous(memory_format=torch.channels_last)
                return self.model.embed(xt).float().cpu().numpy()
        finally:
            self.model.train(was_training)

    def batches(
        self,
        images: Sequence[ImageInput],
        *,
        ranges: Sequence[tuple[int, int]] | None = None,
        batch_size: int = 64,
        num_workers: int = 2,
        executor: Literal["thread", "process"] = "thread",
        augment_seed: int | None = None,
        augment_strength: float = 1.0,
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray, list[str]]]:
        """Features batch by batch, in order: yields ``(start, features (b, feat_dim)
        float32, ok (b,) bool, errors)`` for ``images[start:start + b]``; unreadable rows
        are zero with ``ok=False`` and ``errors`` gives their reasons in order.

        ``ranges``: the ``(start, stop)`` batches to run (default: consecutive slices of
        ``batch_size``), e.g. to keep batches inside a caller's chunks while one decode
        pool and model pool stay busy across all of them. See :meth:`__call__` for the rest.
        """
        if ranges is None:
            ranges = [(s, min(s + batch_size, len(images))) for s in range(0, len(images), batch_size)]
        ranges = [(int(a), int(b)) for a, b in ranges if b > a]
        spec = _PrepSpec(self.image_size, self.channels, self.resize_mode,
                         augment_seed, float(augment_strength))
        multi = len(ranges) > 1 and self.parallel_batches > 1

        def run_model(start: int, u8: np.ndarray, good: np.ndarray,
                      errs: list[str]) -> tuple[int, np.ndarray, np.ndarray, list[str]]:
            feats = np.zeros((len(good), self.feat_dim), dtype=np.float32)
            if good.any():
                feats[good] = self.embed_array(self.normalise(u8[good]), single_thread=multi)
            return start, feats, good, errs

        def decoded() -> Iterator[tuple[int, np.ndarray, np.ndarray, list[str]]]:
            """Decoded batches in order; up to 2 * num_workers in flight."""
            if num_workers <= 0 or len(ranges) <= 1:
                for a, b in ranges:
                    yield _prepare_batch(list(images[a:b]), a, spec)
                return
            pool = _make_pool(executor, num_workers)
            try:
                pending: deque[cf.Future] = deque()
                it = iter(ranges)
                for a, b in it:
                    pending.append(pool.submit(_prepare_batch, list(images[a:b]), a, spec))
                    if len(pending) >= 2 * num_workers:
                        break
                while pending:
                    result = pending.popleft().result()
                    nxt = next(it, None)
                    if nxt is not None:  # keep the workers busy while the model runs
                        pending.append(pool.submit(_prepare_batch, list(images[nxt[0]:nxt[1]]), nxt[0], spec))
                    yield result
            finally:
                pool.shutdown(wait=True, cancel_futures=True)

        if not multi:
            for batch in decoded():
                yield run_model(*batch)
            return
        model_pool = cf.ThreadPoolExecutor(self.parallel_batches, thread_name_prefix="fh-model")
        try:
            running: deque[cf.Future] = deque()
            for batch in decoded():
                running.append(model_pool.submit(run_model, *batch))
                while len(running) >= self.parallel_batches:
                    yield running.popleft().result()
            while running:
                yield running.popleft().result()
        finally:
            model_pool.shutdown(wait=True, cancel_futures=True)

    def __call__(
        self,
        images: Sequence[ImageInput],
        *,
        batch_size: int = 64,
        num_workers: int = 2,
        executor: Literal["thread", "process"] = "thread",
        augment_seed: int | None = None,
        augment_strength: float = 1.0,
        progress: Callable[[int], None] | None = None,
        dtype: "np.typing.DTypeLike" = np.float32,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Features of ``images`` -> ``(features (N, feat_dim) dtype, ok (N,) bool)``.

        ``dtype``: of the array written batch by batch (float16 for large activations: a
        float32 copy of the catalogue would double the peak memory).

        ``num_workers`` decode workers (``executor``: threads or processes; 0 decodes
        inline without overlap). ``augment_seed``: if set, image ``i`` is replaced by
        ``augment(img, default_rng([augment_seed, i]), augment_strength)`` (a simulated
        shopper photo) before resizing. ``progress(n)`` is called from the calling thread
        with the number of images finished after each batch (e.g. ``tqdm.update``).
        """
        n = len(images)
        feats = np.zeros((n, self.feat_dim), dtype=dtype)
        ok = np.zeros(n, dtype=bool)
        errors: list[str] = []
        for start, out, good, errs in self.batches(
                images, batch_size=batch_size, num_workers=num_workers, executor=executor,
                augment_seed=augment_seed, augment_strength=augment_strength):
            feats[start:start + len(good)] = out
            ok[start:start + len(good)] = good
            errors.extend(errs)
            if progress is not None:
                progress(len(good))
        if errors:
            log.warning(
                "%d of %d images could not be read (zero features, ok=False); first: %s",
                len(errors), n, errors[0],
            )
            for e in errors[1:]:
                log.debug("unreadable image: %s", e)
        return feats, ok


def _make_pool(kind: str, workers: int) -> cf.Executor:
    if kind == "thread":
        return cf.ThreadPoolExecutor(workers, thread_name_prefix="fh-decode")
    if kind != "process":
        raise ValueError(f"executor must be 'process' or 'thread', got {kind!r}")
    # forkserver: children never inherit the parent's torch / onnxruntime thread pools.
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
    return cf.ProcessPoolExecutor(workers, mp_context=ctx)


@functools.lru_cache(maxsize=4)
def _default_extractor(backbone_name: str, image_size: int | None, engine: str,
                       resize_mode: str, calibration: "Calibration | None" = None) -> FeatureExtractor:
    return FeatureExtractor(backbone_name, image_size=image_size, engine=engine,  # type: ignore[arg-type]
                            resize_mode=resize_mode, calibration=calibration)


def extract_features(
    images: Sequence[ImageInput],
    backbone_name: str,
    *,
    image_size: int | None = None,
    engine: Engine = "onnx",
    batch_size: int = 64,
    num_workers: int = 2,
    executor: Literal["thread", "process"] = "thread",
    augment_seed: int | None = None,
    augment_strength: float = 1.0,
    resize_mode: str = "letterbox",
    model: "nn.Module | None" = None,
    progress: Callable[[int], None] | None = None,
    calibration: "Calibration | None" = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pooled backbone features of ``images`` (paths, bytes, PIL images or uint8 arrays).

    Returns ``(features (N, feat_dim) float32, ok (N,) bool)``; rows with ``ok=False``
    (unreadable input) are zero. ``image_size`` defaults to the backbone's native size.
    With ``model=None`` the registry's default (pretrained) backbone is used and the
    extractor is cached per (backbone, size, engine, resize_mode, calibration).
    See :class:`FeatureExtractor` for the other arguments.
    """
    if model is None:
        fx = _default_extractor(backbone_name, image_size, engine, resize_mode, calibration)
    else:
        fx = FeatureExtractor(backbone_name, image_size=image_size, engine=engine,
                              model=model, resize_mode=resize_mode, calibration=calibration)
    return fx(images, batch_size=batch_size, num_workers=num_workers, executor=executor,
              augment_seed=augment_seed, augment_strength=augment_strength, progress=progress)
