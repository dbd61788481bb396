"""Image loading, resizing, normalisation and "shopper's photo" augmentation (Pillow + numpy).

Everything here is deterministic given its inputs (``augment`` takes an explicit
``numpy.random.Generator``), never touches global Pillow settings, and works on
``PIL.Image`` objects so it can run in worker processes.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import BinaryIO, Sequence, Union

import numpy as np
from PIL import Image, ImageEnhance, ImageOps, UnidentifiedImageError

__all__ = [
    "ImageError",
    "ImageSource",
    "MAX_IMAGE_PIXELS",
    "WHITE",
    "load_image",
    "to_rgb",
    "letterbox",
    "resize_square",
    "to_tensor_array",
    "preprocess",
    "augment",
]

# Refuse anything larger than this before decoding (a 40 MP phone photo is ~7000x5700).
# Checked per call instead of setting the process-wide ``Image.MAX_IMAGE_PIXELS``.
MAX_IMAGE_PIXELS = 40_000_000
WHITE = (255, 255, 255)

ImageSource = Union[str, os.PathLike, bytes, BinaryIO]


class ImageError(ValueError):
    """An input that cannot be used as an image; ``source`` names the file."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


def _describe(src: ImageSource) -> str:
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    if isinstance(src, (bytes, bytearray)):
        return f"<{len(src)} bytes>"
    return str(getattr(src, "name", "<stream>"))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode -> RGB; transparency is composited onto white (catalogue background)."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, WHITE)
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    return img.convert("RGB")


def load_image(
    src: ImageSource,
    *,
    max_pixels: int = MAX_IMAGE_PIXELS,
    draft_size: int | None = None,
    name: str | None = None,
) -> Image.Image:
    """Decode an image fully and return it as an RGB ``PIL.Image``.

    ``src`` is a path, raw bytes or a binary file object. EXIF orientation is applied
    (phone photos). ``draft_size`` lets JPEG decoding downscale by 1/2..1/8 in the DCT
    while keeping both sides >= ``draft_size`` (much faster for big photos).

    Raises ``ImageError`` (a ``ValueError``) naming the source for a missing, empty,
    non-image, truncated/corrupt or over-large (> ``max_pixels``) input.
    """
    label = name or _describe(src)
    fh: BinaryIO
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.is_file():
            raise ImageError(label, "file not found")
        if path.stat().st_size == 0:
            raise ImageError(label, "empty file (0 bytes)")
        fh = open(path, "rb")
    elif isinstance(src, (bytes, bytearray)):
        if not src:
            raise ImageError(label, "empty input (0 bytes)")
        fh = io.BytesIO(src)
    else:
        fh = src
    try:
        # No warnings.catch_warnings() here: it is not thread-safe. Pillow's own bomb
        # warning only fires above 89 MP, which the max_pixels check below rejects anyway.
        img = Image.open(fh)
        w, h = img.size
        if w * h > max_pixels:
            raise ImageError(label, f"image too large ({w}x{h} = {w * h:,} pixels > {max_pixels:,})")
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.load()  # full decode here so truncated files fail now, not later
        if img.getexif().get(0x0112, 1) != 1:  # EXIF orientation: phone photos
            img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(label, f"image too large ({e})") from None
    except UnidentifiedImageError:
        raise ImageError(label, "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # Pillow reports truncated / corrupt data as OSError (or SyntaxError for some codecs).
        raise ImageError(label, f"corrupt or truncated image ({e})") from None
    finally:
        if fh is not src:
            fh.close()


def letterbox(
    img: Image.Image,
    size: int,
    *,
    fill: tuple[int, int, int] | int = WHITE,
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> Image.Image:
    """Resize keeping the aspect ratio so the longer side is ``size``; pad to ``size x size``.

    Padding is white by default: catalogue photos are shot on white, so the padding
    looks like more background rather than a black frame.
    """
    w, h = img.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), resample)
    if (nw, nh) == (size, size):
        return img
    if img.mode == "L" and isinstance(fill, tuple):
        fill = fill[0]
    canvas = Image.new(img.mode, (size, size), fill)
    canvas.paste(img, ((size - nw) // 2, (size - nh) // 2))
    return canvas


def resize_square(
    img: Image.Image,
    size: int,
    mode: str = "letterbox",
    *,
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> Image.Image:
    """Make a ``size x size`` image: ``"letterbox"`` (keep aspect, pad white) or
    ``"stretch"`` (plain resize, distorts the aspect ratio).

    Stretching fills the frame with the product, which suits ImageNet classifiers
    better on the 3:4 catalogue photos (see tests/test_backbone.py); letterboxing keeps
    shapes undistorted for arbitrary-aspect query photos.
    """
    if mode == "letterbox":
        return letterbox(img, size, resample=resample)
    if mode == "stretch":
        return img if img.size == (size, size) else img.resize((size, size), resample)
    raise ValueError(f"unknown resize mode {mode!r}; use 'letterbox' or 'stretch'")


def to_tensor_array(
    img: Image.Image, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """``PIL.Image`` -> normalised float32 ``(C, H, W)``, ``(x / 255 - mean) / std``.

    RGB gives C=3, greyscale ("L") gives C=1; ``mean``/``std`` have one value per channel.
    """
    arr = np.asarray(img, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    c = arr.shape[2]
    m = np.asarray(mean, dtype=np.float32).reshape(1, 1, -1)
    s = np.asarray(std, dtype=np.float32).reshape(1, 1, -1)
    if m.shape[2] != c or s.shape[2] != c:
        raise ValueError(f"mean/std have {m.shape[2]}/{s.shape[2]} values for {c} channels")
    # Fold /255 into the affine map: one multiply-add over the array.
    arr = arr * (1.0 / (255.0 * s)) - m / s
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def preprocess(
    img: Image.Image,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    channels: int = 3,
    mode: str = "letterbox",
) -> np.ndarray:
    """Resize to ``size x size`` (``mode``: see :func:`resize_square`) and normalise:
    ``PIL.Image -> float32 (channels, size, size)``."""
    if channels == 1 and img.mode != "L":
        img = img.convert("L")
    elif channels == 3 and img.mode != "RGB":
        img = to_rgb(img)
    return to_tensor_array(resize_square(img, size, mode), mean, std)


def border_colour(img: Image.Image) -> tuple[int, int, int]:
    """Median colour of an RGB image's outermost pixels: the background that a rotation must
    fill with (white for catalogue photos, black for Fashion-MNIST: a white fill there drew
    bright corners that are no part of any garment)."""
    a = np.asarray(img)
    edge = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    return tuple(int(v) for v in np.median(edge, axis=0))


def _random_resized_crop(
    img: Image.Image, rng: np.random.Generator, min_area: float
) -> Image.Image:
    """Crop a random window of >= ``min_area`` of the image (aspect jitter 3/4..4/3)."""
    w, h = img.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(min_area, 1.0)
        ratio = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        cw = int(round(np.sqrt(target * ratio)))
        ch = int(round(np.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            x0 = int(rng.integers(0, w - cw + 1))
            y0 = int(rng.integers(0, h - ch + 1))
            return img.crop((x0, y0, x0 + cw, y0 + ch))
    # Fallback (tiny or extreme-aspect images): centred crop at the minimum area.
    s = float(np.sqrt(min_area))
    cw, ch = max(1, int(w * s)), max(1, int(h * s))
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    return img.crop((x0, y0, x0 + cw, y0 + ch))


def augment(
    img: Image.Image,
    rng: np.random.Generator,
    strength: float = 1.0,
    *,
    flip: bool = True,
) -> Image.Image:
    """Simulate a shopper's photo of this product; deterministic given ``rng``'s state.

    At ``strength=1``: optional horizontal flip (p=0.5), random crop keeping >= 70% of
    the area, rotation within +-10 degrees (filled with the border colour), brightness / contrast /
    saturation jitter of +-30%, a mild colour cast (+-6% per channel), rescale by
    0.5x..1.5x and JPEG re-compression at quality 30..90. ``strength`` in [0, 1]
    shrinks every range linearly; 0 returns an unchanged copy. Returns RGB.
    """
    img = to_rgb(img)
    if strength <= 0:
        return img.copy()
    s = float(min(strength, 1.0))

    if flip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)

    w0, h0 = img.size
    img = _random_resized_crop(img, rng, min_area=1.0 - 0.3 * s)
    img = img.resize((w0, h0), Image.Resampling.BILINEAR)

    angle = float(rng.uniform(-10.0, 10.0) * s)
    img = img.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=border_colour(img))

    img = ImageEnhance.Brightness(img).enhance(float(1.0 + rng.uniform(-0.3, 0.3) * s))
    img = ImageEnhance.Contrast(img).enhance(float(1.0 + rng.uniform(-0.3, 0.3) * s))
    img = ImageEnhance.Color(img).enhance(float(1.0 + rng.uniform(-0.3, 0.3) * s))
    # White-balance error of a phone camera: per-channel gain.
    gains = 1.0 + rng.uniform(-0.06, 0.06, size=3) * s
    arr = np.asarray(img, dtype=np.float32) * gains.astype(np.float32)
    img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")

    scale = float(np.exp(rng.uniform(np.log(1.0 - 0.5 * s), np.log(1.0 + 0.5 * s))))
    nw, nh = max(8, round(w0 * scale)), max(8, round(h0 * scale))
    img = img.resize((nw, nh), Image.Resampling.BILINEAR)

    quality = int(rng.integers(round(90 - 60 * s), 91))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    out = Image.open(buf)
    out.load()
    return out.convert("RGB")
