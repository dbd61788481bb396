"""Image loading errors, letterbox / normalisation and the shopper-photo augmentation."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fashionhash.data.transforms import (
    ImageError,
    augment,
    letterbox,
    load_image,
    preprocess,
    resize_square,
    to_tensor_array,
)


def _photo(w: int = 60, h: int = 80, seed: int = 0) -> Image.Image:
    """A product-photo-like test image: white background, a coloured block, some noise."""
    rng = np.random.default_rng(seed)
    arr = np.full((h, w, 3), 255, dtype=np.uint8)
    arr[h // 5: 4 * h // 5, w // 4: 3 * w // 4] = (30, 60, 140)
    arr = np.clip(arr.astype(int) + rng.integers(-20, 20, arr.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width x height`` but carries (almost) no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


# --------------------------------------------------------------------------- load_image

def test_load_valid_jpeg_path_and_bytes(tmp_path: Path) -> None:
    p = tmp_path / "ok.jpg"
    p.write_bytes(_jpeg_bytes(_photo()))
    img = load_image(p)
    assert img.mode == "RGB" and img.size == (60, 80)
    assert load_image(p.read_bytes()).size == (60, 80)


def test_missing_file_names_file(tmp_path: Path) -> None:
    p = tmp_path / "does-not-exist.jpg"
    with pytest.raises(ImageError, match="does-not-exist.jpg") as ei:
        load_image(p)
    assert "not found" in str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_zero_byte_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.jpg.*0 bytes"):
        load_image(p)


def test_not_an_image(tmp_path: Path) -> None:
    p = tmp_path / "notes.jpg"
    p.write_text("id,gender\n1,Men\n")
    with pytest.raises(ImageError, match=r"notes\.jpg.*not a recognised image"):
        load_image(p)


def test_truncated_jpeg_fails_at_load(tmp_path: Path) -> None:
    data = _jpeg_bytes(_photo(200, 200, seed=1))
    p = tmp_path / "truncated.jpg"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"truncated\.jpg.*(corrupt|truncated)"):
        load_image(p)


def test_corrupt_jpeg_header(tmp_path: Path) -> None:
    data = bytearray(_jpeg_bytes(_photo()))
    data[2:40] = b"\x00" * 38  # wipe the segment markers after SOI
    p = tmp_path / "corrupt.jpg"
    p.write_bytes(bytes(data))
    with pytest.raises(ImageError, match=r"corrupt\.jpg"):
        load_image(p)


@pytest.mark.parametrize("side", [7000, 20000])  # 49 MP: our limit; 400 MP: Pillow's bomb error
def test_huge_image_rejected_before_decoding(tmp_path: Path, side: int) -> None:
    p = tmp_path / f"huge{side}.png"
    p.write_bytes(_png_header_only(side, side))
    with pytest.raises(ImageError, match=rf"huge{side}\.png.*too large"):
        load_image(p)


def test_max_pixels_is_per_call_not_global(tmp_path: Path) -> None:
    p = tmp_path / "small.jpg"
    p.write_bytes(_jpeg_bytes(_photo()))
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageError, match="too large"):
        load_image(p, max_pixels=100)
    assert Image.MAX_IMAGE_PIXELS == before
    assert load_image(p).size == (60, 80)


def test_transparency_composited_on_white() -> None:
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    img = load_image(buf.getvalue())
    assert img.mode == "RGB"
    assert np.asarray(img).min() == 255


def test_draft_decodes_big_jpeg_smaller() -> None:
    data = _jpeg_bytes(_photo(800, 1000))
    img = load_image(data, draft_size=128)
    assert 128 <= min(img.size) < 800


# --------------------------------------------------------------------------- resize / tensors

@pytest.mark.parametrize("w,h", [(60, 80), (80, 60), (64, 64), (1, 50), (300, 120)])
@pytest.mark.parametrize("size", [28, 128, 224])
def test_letterbox_size(w: int, h: int, size: int) -> None:
    out = letterbox(_photo(w, h), size)
    assert out.size == (size, size) and out.mode == "RGB"


def test_letterbox_keeps_aspect_and_pads_white() -> None:
    img = Image.new("RGB", (60, 80), (0, 0, 0))
    out = np.asarray(letterbox(img, 128))
    # 60x80 -> 96x128 centred: 16 white columns each side.
    assert (out[:, :16] == 255).all() and (out[:, -16:] == 255).all()
    assert (out[:, 16:112] == 0).all()


def test_letterbox_greyscale() -> None:
    out = letterbox(Image.new("L", (20, 10), 0), 32)
    assert out.mode == "L" and out.size == (32, 32)
    assert np.asarray(out)[0, 0] == 255


def test_resize_square_modes() -> None:
    img = _photo()
    assert resize_square(img, 96, "stretch").size == (96, 96)
    assert resize_square(img, 96, "letterbox").size == (96, 96)
    with pytest.raises(ValueError):
        resize_square(img, 96, "crop")


def test_to_tensor_array_lite_normalisation() -> None:
    img = Image.new("RGB", (4, 3), (255, 127, 0))
    x = to_tensor_array(img, (127 / 255,) * 3, (128 / 255,) * 3)
    assert x.shape == (3, 3, 4) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 0, 0], [128 / 128, 0.0, -127 / 128], atol=1e-6)


def test_preprocess_shapes() -> None:
    img = _photo()
    assert preprocess(img, 128, (0.5,) * 3, (0.5,) * 3).shape == (3, 128, 128)
    assert preprocess(img, 28, (0.5,), (0.5,), channels=1).shape == (1, 28, 28)
    assert preprocess(img, 64, (0.5,) * 3, (0.5,) * 3, mode="stretch").shape == (3, 64, 64)


# --------------------------------------------------------------------------- augment

def test_augment_deterministic_per_seed() -> None:
    img = _photo(120, 160)
    a = augment(img, np.random.default_rng(7))
    b = augment(img, np.random.default_rng(7))
    c = augment(img, np.random.default_rng(8))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert a.size != c.size or not np.array_equal(np.asarray(a), np.asarray(c))


def _distance(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a.resize(b.size), dtype=float) - np.asarray(b, dtype=float)).mean())


def test_augment_returns_valid_varied_images() -> None:
    img = _photo(120, 160)
    sizes = set()
    strong, weak = [], []
    for seed in range(12):
        out = augment(img, np.random.default_rng(seed), strength=1.0)
        assert out.mode == "RGB"
        w, h = out.size
        assert 0.5 * 120 - 1 <= w <= 1.5 * 120 + 1 and 0.5 * 160 - 1 <= h <= 1.5 * 160 + 1
        assert np.asarray(out).std() > 10  # still a picture, not a flat frame
        sizes.add(out.size)
        strong.append(_distance(out, img))
        weak.append(_distance(augment(img, np.random.default_rng(seed), strength=0.2), img))
    assert len(sizes) > 6
    # ``strength`` really scales the damage.
    assert np.mean(weak) < 0.6 * np.mean(strong)


def test_augment_strength_zero_is_identity() -> None:
    img = _photo()
    out = augment(img, np.random.default_rng(0), strength=0.0)
    assert np.array_equal(np.asarray(out), np.asarray(img))
    assert out is not img


def test_augment_fills_rotations_with_the_background() -> None:
    """A garment on black (Fashion-MNIST) keeps a black background after rotation; on white
    (catalogue photos), a white one."""
    for bg, fg in ((0, 200), (255, 40)):
        a = np.full((28, 28), bg, np.uint8)
        a[6:22, 9:19] = fg
        img = Image.fromarray(a, "L")
        for seed in range(6):
            out = np.asarray(augment(img, np.random.default_rng(seed), strength=0.5).convert("L"), dtype=float)
            corners = np.concatenate([out[:2, :2].ravel(), out[:2, -2:].ravel(), out[-2:, :2].ravel(),
                                      out[-2:, -2:].ravel()])
            assert np.abs(corners - bg).max() < 80, (bg, seed, corners)  # jitter moves it a little
