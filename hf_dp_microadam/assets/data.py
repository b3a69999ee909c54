"""Load a dataset by offline name or hub id as a DatasetDict with train, validation and test.

Offline datasets and their splits (the sizes hold for the default fractions):

- "fashion-mnist": columns `image` (PIL image, mode "L", 28x28) and `label` (ClassLabel of
  the 10 Fashion-MNIST class names). The 60,000 source training images are split, per
  class and with `split_seed`, into train 54,000 and validation 6,000 (600 per class);
  test is the source test set of 10,000.
- "rotten-tomatoes": columns `text` and `label` (ClassLabel, 0 "rotten", 1 "fresh"). The
  source CSV has 12,808 labelled review snippets. 56 of them repeat an earlier text with
  the same label and are dropped, and the 12,752 left are 57.8% fresh. They are split per
  class and with `split_seed` into train 10,202, validation 1,275 and test 1,275.

Within each split the rows keep their source order.
"""

from __future__ import annotations

import gzip
import logging
import math
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UnknownAssetError
from .locate import locate_fashion_mnist, locate_rotten_tomatoes
from .registry import OFFLINE_DATASETS, ROTTEN_TOMATOES_FILE

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "validation", "test")
DEFAULT_SPLIT_SEED = 0
VALIDATION_FRACTION = 0.1
"""Share of a source's examples moved to validation when it has no validation split."""
TEST_FRACTION = 0.1
"""Share of a source's examples moved to test when it has no test split."""

# Column names that some hub datasets use instead of `text` and `image`, such as
# glue/sst2 ("sentence") and cifar10 ("img").
_TEXT_COLUMN_ALIASES = ("sentence",)
_IMAGE_COLUMN_ALIASES = ("img",)


def load_dataset_dict(
    name: str,
    *,
    max_samples_per_split: int | Mapping[str, int] | None = None,
    split_seed: int = DEFAULT_SPLIT_SEED,
    config_name: str | None = None,
    text_column: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    **load_dataset_kwargs: Any,
):
    """Load `name` and return a `datasets.DatasetDict` with train, validation and test.

    `name` is an offline name (see `list_offline_datasets()`) or anything
    `datasets.load_dataset` accepts, with `config_name` and `load_dataset_kwargs` passed
    on. A hub dataset without a validation (or test) split gets one by moving 10% of its
    train rows, chosen per class with `split_seed`. Its columns are renamed to `text` or
    `image` and `label`: `text_column`, `image_column` and `label_column` name the source
    columns, and "sentence" and "img" are recognized without them.

    `split_seed` fixes which rows go to which split. Keep the default across training
    runs with different seeds, so that they are evaluated on the same test rows.
    `max_samples_per_split` (an int for every split, or a mapping such as
    `{"train": 5000, "test": 2000}`) keeps a random subset of at most that many rows,
    drawn with `split_seed`, in source order.
    """
    limits = _normalize_limits(max_samples_per_split)
    if name in OFFLINE_DATASETS:
        extra = {
            "config_name": config_name,
            "text_column": text_column,
            "image_column": image_column,
            "label_column": label_column,
        }
        unsupported = sorted(key for key, value in extra.items() if value is not None)
        unsupported += sorted(load_dataset_kwargs)
        if unsupported:
            raise ValueError(f"offline dataset {name!r} takes no {', '.join(unsupported)}")
        if name == "fashion-mnist":
            return _load_fashion_mnist(limits, split_seed)
        return _load_rotten_tomatoes(limits, split_seed)
    return _load_hub_dataset(
        name, config_name, limits, split_seed, text_column, image_column, label_column, load_dataset_kwargs
    )


def read_idx(path: str | Path) -> np.ndarray:
    """Read an unsigned-byte IDX file (the MNIST format), gzipped or not, into an array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file: it does not start with two zero bytes")
    if data[2] != 0x08:
        raise ValueError(f"{path}: IDX type code {data[2]:#04x} is not 0x08 (unsigned byte)")
    ndim = data[3]
    header_size = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header_size])
    if len(data) - header_size != math.prod(shape):
        raise ValueError(
            f"{path}: the header gives shape {shape} ({math.prod(shape)} bytes) but "
            f"{len(data) - header_size} bytes follow it"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


def split_indices_by_class(
    labels: np.ndarray | None, num_rows: int, fractions: Mapping[str, float], seed: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Split the row indices 0..num_rows-1 into held-out parts and the rest.

    Each part named in `fractions` gets `fraction * num_rows` rows (rounded half up),
    shared over the classes in proportion to their sizes by the largest-remainder method,
    so class shares stay as in the source. The rows of each class are drawn with `seed`.
    With `labels` None all rows count as one class. Returns the sorted remaining indices
    and a dict of sorted indices per part.
    """
    if labels is None:
        labels = np.zeros(num_rows, dtype=np.int64)
    labels = np.asarray(labels)
    if len(labels) != num_rows:
        raise ValueError(f"got {len(labels)} labels for {num_rows} rows")
    if any(fraction < 0 for fraction in fractions.values()) or sum(fractions.values()) >= 1:
        raise ValueError(f"split fractions must be non-negative and sum to less than 1, got {dict(fractions)}")

    classes, class_sizes = np.unique(labels, return_counts=True)
    counts = {
        part: _allocate_by_class(math.floor(fraction * num_rows + 0.5), class_sizes)
        for part, fraction in fractions.items()
    }
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {part: [] for part in fractions}
    rest = []
    for class_position, value in enumerate(classes):
        members = rng.permutation(np.flatnonzero(labels == value))
        start = 0
        for part in fractions:
            count = counts[part][class_position]
            parts[part].append(members[start : start + count])
            start += count
        rest.append(members[start:])
    merged = {part: np.sort(np.concatenate(chunks)) for part, chunks in parts.items()}
    return np.sort(np.concatenate(rest)), merged


def _allocate_by_class(total: int, class_sizes: np.ndarray) -> np.ndarray:
    """Share `total` rows over classes in proportion to their sizes (largest remainder)."""
    exact = class_sizes * total / class_sizes.sum()
    counts = np.floor(exact).astype(np.int64)
    shortfall = total - int(counts.sum())
    # Ties go to the class listed first, so the result does not depend on the sort algorithm.
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:shortfall]] += 1
    return counts


def sample_indices(num_rows: int, limit: int | None, seed: int, split: str) -> np.ndarray:
    """Return sorted indices of a random subset of at most `limit` rows, or all rows."""
    if limit is None or num_rows <= limit:
        return np.arange(num_rows)
    rng = np.random.default_rng([seed, SPLIT_NAMES.index(split)])
    return np.sort(rng.choice(num_rows, size=limit, replace=False))


def _normalize_limits(max_samples_per_split) -> dict[str, int | None]:
    if max_samples_per_split is None:
        return dict.fromkeys(SPLIT_NAMES)
    if isinstance(max_samples_per_split, Mapping):
        unknown = sorted(set(max_samples_per_split) - set(SPLIT_NAMES))
        if unknown:
            raise ValueError(f"max_samples_per_split has unknown splits {unknown}; expected {SPLIT_NAMES}")
        limits = {split: max_samples_per_split.get(split) for split in SPLIT_NAMES}
    else:
        limits = dict.fromkeys(SPLIT_NAMES, max_samples_per_split)
    for split, limit in limits.items():
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"max_samples_per_split for {split!r} must be a positive integer, got {limit!r}")
    return limits


def _load_fashion_mnist(limits: dict, split_seed: int):
    import datasets

    entry = OFFLINE_DATASETS["fashion-mnist"]
    folder = locate_fashion_mnist(entry)
    train_images = read_idx(folder / "train-images-idx3-ubyte.gz")
    train_labels = read_idx(folder / "train-labels-idx1-ubyte.gz")
    test_images = read_idx(folder / "t10k-images-idx3-ubyte.gz")
    test_labels = read_idx(folder / "t10k-labels-idx1-ubyte.gz")
    for images, labels, prefix in ((train_images, train_labels, "train"), (test_images, test_labels, "t10k")):
        _check_image_arrays(folder, prefix, images, labels, len(entry.class_names))

    train_rows, held_out = split_indices_by_class(
        train_labels, len(train_labels), {"validation": VALIDATION_FRACTION}, split_seed
    )
    sources = {
        "train": (train_images, train_labels, train_rows),
        "validation": (train_images, train_labels, held_out["validation"]),
        "test": (test_images, test_labels, np.arange(len(test_labels))),
    }
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(entry.class_names))}
    )
    splits = {}
    for split, (images, labels, rows) in sources.items():
        rows = rows[sample_indices(len(rows), limits[split], split_seed, split)]
        splits[split] = datasets.Dataset.from_dict(
            {"image": list(images[rows]), "label": labels[rows].tolist()}, features=features
        )
    return datasets.DatasetDict(splits)


def _check_image_arrays(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"{folder}: {prefix} images of shape {images.shape} do not match labels of shape {labels.shape}"
        )
    if labels.size and labels.max() >= num_classes:
        raise ValueError(f"{folder}: {prefix} labels go up to {labels.max()}, expected 0..{num_classes - 1}")


def _load_rotten_tomatoes(limits: dict, split_seed: int):
    import datasets
    import pandas as pd

    entry = OFFLINE_DATASETS["rotten-tomatoes"]
    path = locate_rotten_tomatoes(entry) / ROTTEN_TOMATOES_FILE
    frame = pd.read_csv(path)
    missing = {"category", "text"} - set(frame.columns)
    if missing:
        raise ValueError(f"{path} has no column(s) {sorted(missing)}; found {list(frame.columns)}")

    # The third category, "plot", contains movie synopses, which are not reviews.
    reviews = frame[frame["category"].isin(["fresh", "rotten"])].dropna(subset=["text"])
    # Identical texts in two splits would leak test rows into training.
    reviews = reviews.drop_duplicates(subset="text", keep="first")
    texts = reviews["text"].astype(str).tolist()
    labels = (reviews["category"] == "fresh").to_numpy(dtype=np.int64)

    train_rows, held_out = split_indices_by_class(
        labels, len(labels), {"test": TEST_FRACTION, "validation": VALIDATION_FRACTION}, split_seed
    )
    rows_per_split = {"train": train_rows, **held_out}
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(entry.class_names))}
    )
    splits = {}
    for split in SPLIT_NAMES:
        rows = rows_per_split[split]
        rows = rows[sample_indices(len(rows), limits[split], split_seed, split)]
        splits[split] = datasets.Dataset.from_dict(
            {"text": [texts[row] for row in rows], "label": labels[rows].tolist()}, features=features
        )
    return datasets.DatasetDict(splits)


def _load_hub_dataset(
    name: str,
    config_name: str | None,
    limits: dict,
    split_seed: int,
    text_column: str | None,
    image_column: str | None,
    label_column: str | None,
    load_dataset_kwargs: dict,
):
    import datasets

    if "split" in load_dataset_kwargs:
        raise ValueError("split is not supported: load_dataset_dict returns all three splits")
    try:
        loaded = datasets.load_dataset(name, config_name, **load_dataset_kwargs)
    except (FileNotFoundError, ConnectionError) as error:
        if Path(name).exists():
            raise
        raise UnknownAssetError(
            f"{name!r} is not an offline dataset name ({', '.join(OFFLINE_DATASETS)}), and "
            f"datasets.load_dataset could not load it: {error}"
        ) from error

    if "train" not in loaded:
        raise ValueError(f"dataset {name!r} has no train split; its splits are {list(loaded)}")
    loaded = datasets.DatasetDict(
        {split: _rename_columns(dataset, name, text_column, image_column, label_column) for split, dataset in loaded.items()}
    )

    train = loaded["train"]
    fractions = {}
    if "test" not in loaded:
        fractions["test"] = TEST_FRACTION
    if "validation" not in loaded:
        fractions["validation"] = VALIDATION_FRACTION
    splits = {split: loaded[split] for split in SPLIT_NAMES if split in loaded}
    if fractions:
        train_rows, held_out = split_indices_by_class(
            _stratification_labels(train), len(train), fractions, split_seed
        )
        splits["train"] = train.select(train_rows)
        for split, rows in held_out.items():
            splits[split] = train.select(rows)

    if _all_labels_missing(splits["test"]):
        # GLUE, for example, publishes its test splits without labels.
        logger.warning(
            "Every label of the test split of %r is -1 (unlabelled), so test accuracy cannot be "
            "measured on it; evaluate on the validation split instead",
            name,
        )

    limited = {}
    for split in SPLIT_NAMES:
        dataset = splits[split]
        rows = sample_indices(len(dataset), limits[split], split_seed, split)
        limited[split] = dataset if len(rows) == len(dataset) else dataset.select(rows)
    return datasets.DatasetDict(limited)


def _rename_columns(dataset, name: str, text_column, image_column, label_column):
    renames = {}
    for source, target in ((text_column, "text"), (image_column, "image"), (label_column, "label")):
        if source is not None and source != target:
            if source not in dataset.column_names:
                raise ValueError(
                    f"dataset {name!r} has no column {source!r}; its columns are {dataset.column_names}"
                )
            renames[source] = target
    columns = set(dataset.column_names) - set(renames) | set(renames.values())
    for aliases, target in ((_TEXT_COLUMN_ALIASES, "text"), (_IMAGE_COLUMN_ALIASES, "image")):
        if target not in columns:
            for alias in aliases:
                if alias in dataset.column_names and alias not in renames:
                    renames[alias] = target
                    columns.add(target)
                    break
    if renames:
        dataset = dataset.rename_columns(renames)
    if "label" not in dataset.column_names or not {"text", "image"} & set(dataset.column_names):
        raise ValueError(
            f"dataset {name!r} needs a label column and a text or image column, but has "
            f"{dataset.column_names}; name them with text_column, image_column and label_column"
        )
    return dataset


def _all_labels_missing(dataset) -> bool:
    labels = np.asarray(dataset["label"])
    return len(labels) > 0 and labels.dtype.kind in "iu" and bool(np.all(labels == -1))


def _stratification_labels(dataset) -> np.ndarray | None:
    """Return the labels to split by class, or None when `label` is not categorical."""
    import datasets

    feature = dataset.features["label"]
    categorical = isinstance(feature, datasets.ClassLabel) or (
        isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))
    )
    return np.asarray(dataset["label"]) if categorical else None
