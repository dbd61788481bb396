"""Fast encoding: ONNX Runtime and PyTorch give the same codes on real photos, the ONNX
export carries a finetune run's own backbone, batch encoding is shardable and mergeable
into an index, and a run killed with SIGKILL resumes without losing or repeating a photo.

The runs here are built directly (random hash heads on the real pretrained backbone), not
trained: what is tested is the engines and the bookkeeping, not the codes' quality.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fashionhash import codes as C
from fashionhash.cli import main
from fashionhash.config import Config, save_config
from fashionhash.data.transforms import ImageError
from fashionhash.encoding import (
    IncompleteEncoding,
    encode_folder,
    list_images,
    merge_chunks,
)
from fashionhash.index.build import IndexInfo, index_encoded
from fashionhash.models.backbones import preprocessing_for
from fashionhash.pipeline import build_method, image_array, load_run

CLASSES = ["Casual Shoes", "Jeans", "Tshirts", "Watches"]
#: relaxed values closer to 0 than this can round to either sign in another engine
NEAR_ZERO = 1e-4


def _make_run(path: Path, *, mode: str, image_size: int, n_bits: int, seed: int = 0,
              backbone_scale: float | None = None) -> Path:
    """A run directory whose checkpoint holds a seeded, untrained method."""
    cfg = Config()
    cfg.model.mode, cfg.model.image_size, cfg.model.n_bits, cfg.model.hidden = mode, image_size, n_bits, 256
    path.mkdir(parents=True)
    save_config(cfg, path / "config.yaml")
    (path / "meta.json").write_text(json.dumps({"classes": CLASSES}))
    torch.manual_seed(seed)
    state = build_method(cfg, len(CLASSES)).state_dict()
    if backbone_scale is not None:  # make a finetune run's backbone differ from ImageNet's
        state["backbone._conv_head.weight"] = state["backbone._conv_head.weight"] * backbone_scale
    (path / "checkpoints").mkdir()
    torch.save({"method": state, "epoch": 0}, path / "checkpoints" / "best.pt")
    return path


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory) -> Path:
    """Frozen mode at the demo's size: ImageNet EfficientNet-Lite0 at 128 px + a 64-bit head."""
    return _make_run(tmp_path_factory.mktemp("enc") / "frozen", mode="frozen", image_size=128, n_bits=64)


def _photos(tiny_kaggle: Path) -> list[str]:
    return [str(p) for p in sorted((tiny_kaggle / "images").glob("*.jpg"))]


def _engine_report(a: np.ndarray, b: np.ndarray, ok: np.ndarray) -> str:
    near = np.abs(b[ok]) < NEAR_ZERO
    flips = int(C.hamming(C.pack(a[ok]), C.pack(b[ok])).diagonal().sum())
    return (f"{flips} packed bits differ; {int(near.sum())} of {near.size} "
            f"relaxed values within {NEAR_ZERO} of 0; max |difference| {np.abs(a - b).max():.2e}")


def test_onnx_and_torch_codes_identical_on_real_photos(frozen_run, tiny_kaggle):
    run = load_run(frozen_run)
    photos = _photos(tiny_kaggle)  # 161 real photos and the fixture's corrupt JPEG
    real_onnx, ok_onnx = run.encode_sources(photos, engine="onnx")
    real_torch, ok_torch = run.encode_sources(photos, engine="torch")
    assert ok_onnx.tolist() == ok_torch.tolist() and int((~ok_onnx).sum()) == 1
    # bit for bit, on every photo; the message says whether a near-zero value explains a failure
    msg = _engine_report(real_onnx, real_torch, ok_onnx)
    assert np.array_equal(C.pack(real_onnx[ok_onnx]), C.pack(real_torch[ok_torch])), msg
    np.testing.assert_allclose(real_onnx, real_torch, atol=1e-4)
    # ... and the same codes as the path the run was trained on (cached backbone features,
    # then the hash head in PyTorch)
    from fashionhash.models.features import extract_features

    feats, ok = extract_features(photos, "efficientnet_lite0", image_size=128)
    real_feat = run.codes_from_inputs(feats)
    assert np.array_equal(C.pack(real_feat[ok]), C.pack(real_onnx[ok])), _engine_report(real_onnx, real_feat, ok)
    # a random 64-bit head on real photos gives varied codes, so equality means something
    assert len(np.unique(C.pack(real_onnx[ok_onnx]), axis=0)) > 50


def test_encode_cli_engine_option(frozen_run, tiny_kaggle, capsys, tmp_path):
    photo = _photos(tiny_kaggle)[5]
    out = {}
    for engine in ("onnx", "torch"):
        assert main(["encode", str(frozen_run), photo, "--engine", engine, "--out", str(tmp_path / f"{engine}.npz")]) == 0
        out[engine] = capsys.readouterr().out.split()[0]
    assert out["onnx"] == out["torch"] and len(out["onnx"]) == 16  # 64 bits in hex


def test_export_finetune_run_uses_its_own_backbone(tiny_kaggle, tmp_path):
    import onnxruntime as ort

    from fashionhash.models.backbones import build_backbone

    run_dir = _make_run(tmp_path / "ft", mode="finetune", image_size=64, n_bits=16, backbone_scale=0.5)
    out = tmp_path / "encoder.onnx"
    assert main(["export", str(run_dir), "--onnx", "--out", str(out)]) == 0
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    assert meta["fashionhash.n_bits"] == "16" and meta["fashionhash.image_size"] == "64"
    assert sess.get_inputs()[0].name == "input" and sess.get_outputs()[0].name == "codes"

    spec = preprocessing_for("efficientnet_lite0")
    x = []
    for photo in _photos(tiny_kaggle)[:24]:
        try:
            x.append(image_array(photo, spec, 64))
        except ImageError:
            pass  # the tiny catalogue's corrupt JPEG
    x = np.stack(x)
    got = sess.run(None, {"input": x})[0]
    run = load_run(run_dir)
    with torch.inference_mode():
        want = run.method.encode(torch.from_numpy(x)).numpy()
        imagenet = torch.tanh(run.method.head(build_backbone("efficientnet_lite0").embed(torch.from_numpy(x)))).numpy()
    assert got.shape == (len(x), 16)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.array_equal(C.pack(got), C.pack(want)), _engine_report(got, want, np.ones(len(x), bool))
    assert np.abs(got - imagenet).max() > 1e-2  # the run's (scaled) backbone, not ImageNet's


def _manifest(tiny_kaggle: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """A CSV over the fixture's photos (relative paths, ids, a colour column) plus a row
    whose file does not exist."""
    photos = _photos(tiny_kaggle)
    path = tmp_path / "photos.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "id", "colour"])
        for i, p in enumerate(photos):
            w.writerow([os.path.relpath(p, tmp_path), 1000 + i, "red" if i % 2 else "blue"])
        w.writerow(["gone.jpg", 5000, "red"])
    return path, photos + [str(tmp_path / "gone.jpg")]


def test_sharded_batch_encoding_merges_into_an_index(frozen_run, tiny_kaggle, tmp_path):
    run = load_run(frozen_run)
    manifest, photos = _manifest(tiny_kaggle, tmp_path)
    out = tmp_path / "out"
    seen: list[int] = []

    def phase(name: str, total: int):
        seen.append(total)
        return seen.append

    first = encode_folder(run, manifest, out, shard=(0, 2), chunk_size=32, batch_size=16, progress=phase)
    assert not first.complete and first.written_chunks == 3  # chunks 0, 2, 4 of 6
    assert seen[0] == sum(seen[1:]) == 32 * 3
    with pytest.raises(IncompleteEncoding, match="3 of 6 chunks missing"):
        merge_chunks(out)
    with pytest.raises(FileExistsError, match="resume"):
        encode_folder(run, manifest, out, shard=(0, 2), chunk_size=32)
    with pytest.raises(ValueError, match="chunk_size"):
        encode_folder(run, manifest, out, shard=(1, 2), chunk_size=64, resume=True)
    second = encode_folder(run, manifest, out, shard=(1, 2), chunk_size=32, batch_size=16)
    assert second.complete and second.encoded == len(photos) - 96

    merged = merge_chunks(out)
    assert merged.ids.tolist() == [1000 + i for i in range(len(photos) - 1)] + [5000]
    real, ok = run.encode_sources(photos)
    assert merged.ok.tolist() == ok.tolist() and int((~ok).sum()) == 2  # corrupt JPEG + missing file
    assert sorted(Path(p).name for p, _ in merged.failed) == ["99000001.jpg", "gone.jpg"]
    assert np.array_equal(merged.packed[ok], C.pack(real[ok])), _engine_report(merged.real, real, ok)

    index = index_encoded(out, tmp_path / "index")
    try:
        assert len(index) == int(ok.sum())
        dist, ids = index.search(merged.packed[3:4], k=5)
        assert dist[0, 0] == 0 and merged.ids[3] in ids[0][dist[0] == 0]
        assert index.get(int(merged.ids[3]))["colour"] == ("red" if 3 % 2 else "blue")
    finally:
        index.close()
    info = IndexInfo.load(tmp_path / "index")
    assert info.count == len(index) and info.skipped == 2 and info.items == "manifest"
    assert info.facet_keys == ["colour"] and info.label_key is None  # the page's filter


def test_killed_encoding_resumes_exactly_once(frozen_run, data_root, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in sorted((data_root / "images").glob("*.jpg"))[:400]:
        (folder / p.name).symlink_to(p)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    n = len(list_images(folder))
    out, ref = tmp_path / "killed", tmp_path / "uninterrupted"
    args = ["encode", str(frozen_run), "--folder", str(folder), "--chunk-size", "16", "--batch-size", "8",
            "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "fashionhash.cli", *args, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    chunks = out / "chunks"
    deadline = time.monotonic() + 300
    while not list(chunks.glob("*.npz")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    before = {p.name: p.stat().st_mtime_ns for p in chunks.glob("*.npz")}
    n_chunks = -(-n // 16)
    assert 1 <= len(before) < n_chunks, f"the kill came too late: {len(before)} of {n_chunks} chunks"

    assert main([*args, "--out", str(out), "--resume"]) == 0
    # the chunks written before the kill were kept, not encoded again
    assert {p: (chunks / p).stat().st_mtime_ns for p in before} == before
    assert not list(chunks.glob(".*.tmp"))
    assert main([*args, "--out", str(ref)]) == 0
    a, b = merge_chunks(out), merge_chunks(ref)  # each checks every photo is there once
    assert a.ids.tolist() == b.ids.tolist() and len(a.ids) == n
    assert a.ok.tolist() == b.ok.tolist() and a.failed == b.failed and len(a.failed) == 1
    assert np.array_equal(a.packed, b.packed) and np.array_equal(a.real, b.real)
    with np.load(out / "codes.npz") as z:
        assert np.array_equal(z["packed"], a.packed) and z["ids"].tolist() == a.ids.tolist()
    assert "broken.jpg" in (out / "unreadable.txt").read_text()
