"""What the results table runs: its rows (method variants), the learning rates tried, and
one plan per dataset (config, bit lengths, seeds, the epoch cap and early-stopping patience)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fashionhash.data.catalogue import default_data_root

if TYPE_CHECKING:
    from fashionhash.pipeline import PhaseFactory

#: label -> (registered method, overrides, row name). Order = row order of the table.
VARIANTS: dict[str, tuple[str, list[str], str]] = {
    "adversarial": ("adversarial", [], "**adversarial (Singh et al. 2019, the paper)**"),
    "adversarial-no-adv": ("adversarial", ["method.params.w_adv=0"], "ablation: no adversary (w_adv=0)"),
    "adversarial-no-cls": ("adversarial", ["method.params.w_cls=0"], "ablation: no classifier (w_cls=0)"),
    "adversarial-no-pair": ("adversarial", ["method.params.w_pair=0"], "ablation: no pairwise term (w_pair=0)"),
    # the only row that needs augmented views: the others train without them (half the cost
    # of an epoch, as the demo)
    "adversarial-item": ("adversarial", ["method.params.w_item=0.1", "method.params.item_bits={quarter}",
                                         "data.n_views=1"],
                         "variant: + item-level view matching on a quarter of the bits (w_item=0.1, item_bits=K/4)"),
    # the best form of the paper's method we could make: its classifier and adversary on the
    # strongest peer's loss (CSQ's hash centres) instead of its own pairwise term
    "adversarial-csq": ("adversarial", ["method.params.w_centre=1", "method.params.w_pair=0"],
                        "variant: the paper's classifier + adversary on CSQ's hash centres (w_centre=1, w_pair=0)"),
    "dch": ("dch", [], "DCH"),
    "hashnet": ("hashnet", [], "HashNet"),
    "dpsh": ("dpsh", [], "DPSH"),
    "dsh": ("dsh", [], "DSH"),
    "csq": ("csq", [], "CSQ"),
    "dlbhc": ("dlbhc", [], "DLBHC"),
    "sgml": ("sgml", [], "SGML, binarised (sign)"),
    "lsh": ("lsh", [], "LSH"),
    "itq": ("itq", [], "ITQ"),
}
SHALLOW = ("lsh", "itq")  # closed-form fits: no epochs, no learning rate, cheap at every bit length
PAPER = "adversarial"
ABLATIONS = ("adversarial-no-adv", "adversarial-no-cls", "adversarial-no-pair", "adversarial-item")
#: rows that are not hashing runs of their own
SGML_REAL, NAIVE_PIXELS, NAIVE_FEATURES = "sgml-real", "naive-pixels", "naive-features"
EXTRA_ROWS = {
    SGML_REAL: "SGML, real-valued embedding (float32, cosine)",
    NAIVE_PIXELS: "naive L1 match, pixels (no hashing)",
    NAIVE_FEATURES: "naive L1 match, backbone features (no hashing)",
}
ALL_BITS = (16, 32, 64)
N_SEEDS = 3
#: seeds of the ablations and of the paper's method beside them (paired by seed), at the
#: largest bit length: the paper's claim is a difference between them, so it needs more
ABLATION_SEEDS = 5
#: learning rates (``train.lr``) every learned method tries at seed 0 and the largest bit
#: length; the best on val (``train.select_metric``) is used for its other runs
LRS = (3e-4, 1e-3, 3e-3)
MAX_EPOCHS, PATIENCE = 60, 5


@dataclass
class TableOptions:
    """What to run and where (the ``fashionhash table`` command's options)."""

    datasets: tuple[str, ...] = ("kaggle", "fashion_mnist")
    methods: str | None = None  # comma list of row labels, "ablations", "naive", "all"
    bits: tuple[int, ...] | None = None  # default ALL_BITS (quick: 16)
    seeds: int | None = None  # default N_SEEDS (quick: 2)
    ablation_seeds: int | None = None  # default ABLATION_SEEDS (quick: 2)
    max_epochs: int | None = None  # default MAX_EPOCHS (quick: 2)
    patience: int | None = None  # default PATIENCE (quick: 1)
    lrs: tuple[float, ...] | None = None  # default LRS (quick: two of them)
    all_bits: bool = False
    quick: bool = False
    jobs: int = 1
    runs: Path = Path("runs/table")
    out: Path = Path("benchmarks/results")
    readme: Path | None = None
    headline: Path | None = None  # a page (the README) that gets the summary of the table
    data: str | None = None
    fmnist: str | None = None
    configs: Path = Path(__file__).resolve().parents[3] / "configs"  # the source tree's
    command: str = ""  # how the table was asked for, written above it
    progress: "PhaseFactory | None" = None  # bars of the feature computation (the CLI's)


@dataclass
class Plan:
    """How one dataset is run within the time budget."""

    key: str
    title: str
    config: Path
    max_epochs: int
    patience: int
    lrs: tuple[float, ...]
    #: variants trained at every bit length: "all", or every one but the ablations ("methods")
    low_bits: str = "all"
    seed_bits: tuple[int, ...] = ALL_BITS  # bit lengths that get seeds 1..N-1
    overrides: list[str] = field(default_factory=list)
    skip: tuple[str, ...] = ()  # variant labels not run on this dataset (said in its notes)


def make_plans(opts: TableOptions) -> dict[str, Plan]:
    """Both datasets use the same protocol, so that every method sees the same backbone and
    the same features: frozen ImageNet EfficientNet-Lite0 features (computed once, cached),
    heads trained on them until the val score stops improving (``patience`` epochs, at most
    ``max_epochs``), after a learning-rate choice per method on val. Product photos at 224 px
    with the demo's 1280-1024-K head; Fashion-MNIST's 28x28 greyscale digits of clothing at
    64 px (a 1-NN probe on 4,000 training images scored 0.797 at 64 px, 0.801 at 128).
    Training the small CNN end to end (``configs/fashion_mnist.yaml``) costs ~1-3 ms per
    image per pass on 2 cores, far too slow for this many runs. Every method at every bit
    length (the ablations only at the largest), three seeds of every row at the largest.
    """
    data = Path(opts.data).resolve() if opts.data else default_data_root().resolve()
    cap = opts.max_epochs or (2 if opts.quick else MAX_EPOCHS)
    patience = opts.patience if opts.patience is not None else (1 if opts.quick else PATIENCE)
    lrs = tuple(opts.lrs or (LRS[1:] if opts.quick else LRS))
    seed_bits = ALL_BITS if opts.quick or opts.all_bits else (64,)
    low_bits = "all" if opts.all_bits else "methods"
    plans = {
        "kaggle": Plan(
            "kaggle", "Product photos (Kaggle fashion-product-images-small)", opts.configs / "demo.yaml",
            cap, patience, lrs, low_bits, seed_bits,
            # the demo's features and head (224 px, 1280-1024-K, no augmented views) in
            # float32 (the demo's int8 engine is a speed option, not part of the comparison);
            # the table measures the codes alone (the paper's single stage): no second stage
            overrides=[f"data.root={data}", "descriptor.kind=none", "model.engine=onnx",
                       "model.int8_float_front=0"]),
        # no augmented views and no damaged copies: there is no same-product test here
        "fashion_mnist": Plan(
            "fashion_mnist", "Fashion-MNIST", opts.configs / "fashion_mnist.yaml",
            cap, patience, lrs, low_bits, seed_bits,
            overrides=[*([f"data.root={Path(opts.fmnist).resolve()}"] if opts.fmnist else []),
                       "model.mode=frozen", "model.backbone=efficientnet_lite0", "model.image_size=64",
                       "data.n_views=0", "train.batch_size=256"],
            skip=("adversarial-item",)),
    }
    if opts.quick:
        plans["kaggle"].overrides += [
            "data.limit=400", "data.n_query=40", "data.n_val=30", "data.min_per_class=5",
            "data.n_damaged=20", "model.image_size=64", "model.hidden=64", "train.batch_size=32",
            "train.num_workers=1"]
        plans["fashion_mnist"].overrides += [
            "data.limit=400", "data.n_query=30", "data.n_val=20", "data.min_per_class=1",
            "model.hidden=64", "train.batch_size=64", "train.num_workers=0"]
    return plans


def select_labels(spec: str | None, quick: bool) -> tuple[list[str], list[str]]:
    """(hashing variant labels, extra row labels) from ``--methods``."""
    if spec is None:
        spec = "adversarial,dpsh,sgml,lsh,naive" if quick else "all"
    labels, extra = [], []
    for n in (s.strip() for s in spec.split(",") if s.strip()):
        if n == "all":
            labels += list(VARIANTS)
            extra += [SGML_REAL, NAIVE_PIXELS, NAIVE_FEATURES]
        elif n == "ablations":
            labels += list(ABLATIONS)
        elif n == "naive":
            extra += [NAIVE_PIXELS, NAIVE_FEATURES]
        elif n in (NAIVE_PIXELS, NAIVE_FEATURES):
            extra.append(n)
        elif n in (SGML_REAL, "sgml"):
            labels.append("sgml")
            extra.append(SGML_REAL)
        elif n in VARIANTS:
            labels.append(n)
        else:
            raise ValueError(f"unknown method {n!r}: {', '.join(VARIANTS)}, ablations, naive, "
                             f"{SGML_REAL}, {NAIVE_PIXELS}, {NAIVE_FEATURES}, all")
    return [v for v in VARIANTS if v in labels], [e for e in EXTRA_ROWS if e in extra]  # table order
