"""load_dataset_dict on synthetic IDX and CSV files: splits, determinism, sizes, columns."""

import gzip

import numpy as np
import pytest

from hf_dp_microadam import assets
from hf_dp_microadam.assets import data
from hf_dp_microadam.assets.errors import UnknownAssetError


def _image_ids(dataset, image_index):
    return [image_index(image) for image in dataset["image"]]


# IDX reader


@pytest.mark.parametrize("name", ["images.idx", "images.idx.gz"])
def test_read_idx_round_trip(tmp_path, idx_writer, name):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    idx_writer(tmp_path / name, array)
    np.testing.assert_array_equal(assets.read_idx(tmp_path / name), array)


def test_read_idx_rejects_bad_magic(tmp_path):
    (tmp_path / "bad.idx").write_bytes(b"\x01\x00\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match="not an IDX file"):
        assets.read_idx(tmp_path / "bad.idx")


def test_read_idx_rejects_other_types(tmp_path):
    (tmp_path / "float.idx").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01" + bytes(4))
    with pytest.raises(ValueError, match="0x0d"):
        assets.read_idx(tmp_path / "float.idx")


def test_read_idx_rejects_truncated_file(tmp_path):
    (tmp_path / "short.idx.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x05abc"))
    with pytest.raises(ValueError, match="5 bytes"):
        assets.read_idx(tmp_path / "short.idx.gz")


# Splitting helpers


def test_split_indices_by_class_shares():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    rest, parts = data.split_indices_by_class(labels, 100, {"test": 0.1, "validation": 0.2}, seed=3)

    assert np.bincount(labels[parts["test"]]).tolist() == [5, 3, 2]
    assert np.bincount(labels[parts["validation"]]).tolist() == [10, 6, 4]
    everything = np.concatenate([rest, parts["test"], parts["validation"]])
    assert sorted(everything.tolist()) == list(range(100))
    assert np.all(np.diff(rest) > 0)


def test_split_indices_total_is_exact():
    labels = np.repeat([0, 1], [25, 25])
    rest, parts = data.split_indices_by_class(labels, 50, {"validation": 0.1}, seed=0)

    assert len(parts["validation"]) == 5
    # The half row left over after 2 + 2 goes to the first class.
    assert np.bincount(labels[parts["validation"]]).tolist() == [3, 2]
    assert len(rest) == 45


@pytest.mark.parametrize("fractions", [{"test": 0.5, "validation": 0.5}, {"test": -0.1}])
def test_split_indices_rejects_fractions(fractions):
    with pytest.raises(ValueError, match="split fractions"):
        data.split_indices_by_class(None, 10, fractions, seed=0)


def test_split_indices_by_class_seeded():
    labels = np.tile([0, 1], 50)
    first = data.split_indices_by_class(labels, 100, {"validation": 0.1}, seed=0)
    again = data.split_indices_by_class(labels, 100, {"validation": 0.1}, seed=0)
    other = data.split_indices_by_class(labels, 100, {"validation": 0.1}, seed=1)

    np.testing.assert_array_equal(first[1]["validation"], again[1]["validation"])
    assert first[1]["validation"].tolist() != other[1]["validation"].tolist()


def test_split_indices_without_labels():
    rest, parts = data.split_indices_by_class(None, 7, {"validation": 0.3}, seed=0)
    assert len(parts["validation"]) == 2
    assert len(rest) == 5


def test_sample_indices_limits_and_sorts():
    indices = data.sample_indices(100, 10, seed=0, split="train")
    assert len(indices) == 10
    assert len(set(indices.tolist())) == 10
    assert np.all(np.diff(indices) > 0)
    np.testing.assert_array_equal(data.sample_indices(5, 10, seed=0, split="train"), np.arange(5))


# Fashion-MNIST


def test_fashion_mnist_splits(fake_fashion_mnist, image_index):
    splits = assets.load_dataset_dict("fashion-mnist")

    assert list(splits) == ["train", "validation", "test"]
    assert splits.num_rows == {"train": 180, "validation": 20, "test": 50}
    assert np.bincount(splits["validation"]["label"]).tolist() == [2] * 10
    assert np.bincount(splits["train"]["label"]).tolist() == [18] * 10
    assert splits["train"].features["label"].names[0] == "T-shirt/top"
    assert splits["train"].features["label"].names[9] == "Ankle boot"


def test_fashion_mnist_images_match_source(fake_fashion_mnist, image_index):
    splits = assets.load_dataset_dict("fashion-mnist")

    image = splits["test"][3]["image"]
    assert image.mode == "L"
    assert image.size == (28, 28)
    assert _image_ids(splits["test"], image_index) == [1000 + i for i in range(50)]
    train_ids = _image_ids(splits["train"], image_index)
    validation_ids = _image_ids(splits["validation"], image_index)
    assert sorted(train_ids + validation_ids) == list(range(200))
    assert train_ids == sorted(train_ids)
    # Source image i has label i % 10 in the fake files.
    assert [i % 10 for i in validation_ids] == splits["validation"]["label"]


def test_fashion_mnist_split_seed(fake_fashion_mnist, image_index):
    first = assets.load_dataset_dict("fashion-mnist")
    again = assets.load_dataset_dict("fashion-mnist")
    other = assets.load_dataset_dict("fashion-mnist", split_seed=1)

    assert _image_ids(first["validation"], image_index) == _image_ids(again["validation"], image_index)
    assert _image_ids(first["validation"], image_index) != _image_ids(other["validation"], image_index)


def test_fashion_mnist_max_samples(fake_fashion_mnist, image_index):
    limited = assets.load_dataset_dict("fashion-mnist", max_samples_per_split=7)
    full = assets.load_dataset_dict("fashion-mnist")

    assert limited.num_rows == {"train": 7, "validation": 7, "test": 7}
    assert set(_image_ids(limited["train"], image_index)) <= set(_image_ids(full["train"], image_index))
    again = assets.load_dataset_dict("fashion-mnist", max_samples_per_split=7)
    assert _image_ids(limited["train"], image_index) == _image_ids(again["train"], image_index)


def test_fashion_mnist_max_samples_per_split_mapping(fake_fashion_mnist):
    limited = assets.load_dataset_dict("fashion-mnist", max_samples_per_split={"train": 30, "test": 4})
    assert limited.num_rows == {"train": 30, "validation": 20, "test": 4}


def test_fashion_mnist_inconsistent_files(fake_fashion_mnist, idx_writer):
    idx_writer(fake_fashion_mnist / "t10k-labels-idx1-ubyte.gz", np.zeros(3, dtype=np.uint8))
    with pytest.raises(ValueError, match="do not match labels"):
        assets.load_dataset_dict("fashion-mnist")


@pytest.mark.parametrize(
    "limit",
    [0, -3, 2.5, True, {"training": 5}, {"train": 0}],
)
def test_invalid_max_samples(fake_fashion_mnist, limit):
    with pytest.raises(ValueError, match="max_samples_per_split"):
        assets.load_dataset_dict("fashion-mnist", max_samples_per_split=limit)


def test_offline_dataset_rejects_hub_arguments(fake_fashion_mnist):
    with pytest.raises(ValueError, match="takes no config_name, text_column"):
        assets.load_dataset_dict("fashion-mnist", config_name="x", text_column="y")
    with pytest.raises(ValueError, match="takes no data_files"):
        assets.load_dataset_dict("fashion-mnist", data_files="x.csv")


# Rotten Tomatoes


def test_rotten_tomatoes_rows_and_labels(fake_rotten_tomatoes):
    splits = assets.load_dataset_dict("rotten-tomatoes")

    assert splits.num_rows == {"train": 80, "validation": 10, "test": 10}
    texts = [text for split in splits.values() for text in split["text"]]
    assert len(texts) == len(set(texts)) == 100
    assert not any(text.startswith("plot") for text in texts)
    for split in splits.values():
        for row in split:
            expected = 1 if row["text"].startswith("fresh") else 0
            assert row["label"] == expected
    assert splits["train"].features["label"].names == ["rotten", "fresh"]
    assert splits["test"].column_names == ["text", "label"]


def test_rotten_tomatoes_class_shares(fake_rotten_tomatoes):
    splits = assets.load_dataset_dict("rotten-tomatoes")
    assert np.bincount(splits["test"]["label"]).tolist() == [4, 6]
    assert np.bincount(splits["validation"]["label"]).tolist() == [4, 6]
    assert np.bincount(splits["train"]["label"]).tolist() == [32, 48]


def test_rotten_tomatoes_split_seed(fake_rotten_tomatoes):
    first = assets.load_dataset_dict("rotten-tomatoes")
    again = assets.load_dataset_dict("rotten-tomatoes")
    other = assets.load_dataset_dict("rotten-tomatoes", split_seed=7)

    assert first["test"]["text"] == again["test"]["text"]
    assert first["train"]["text"] == again["train"]["text"]
    assert first["test"]["text"] != other["test"]["text"]


def test_rotten_tomatoes_max_samples(fake_rotten_tomatoes):
    splits = assets.load_dataset_dict("rotten-tomatoes", max_samples_per_split={"train": 12})
    assert splits.num_rows == {"train": 12, "validation": 10, "test": 10}


# Hub path, through datasets' packaged CSV builder


@pytest.fixture
def sentence_csv(tmp_path):
    lines = ["sentence,label"] + [f"sentence number {i},{i % 2}" for i in range(50)]
    path = tmp_path / "train.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_hub_path_adds_missing_splits(sentence_csv):
    splits = assets.load_dataset_dict("csv", data_files={"train": str(sentence_csv)})

    assert list(splits) == ["train", "validation", "test"]
    assert splits.num_rows == {"train": 40, "validation": 5, "test": 5}
    assert "text" in splits["train"].column_names
    assert "sentence" not in splits["train"].column_names
    texts = [text for split in splits.values() for text in split["text"]]
    assert len(set(texts)) == 50


def test_hub_path_split_is_seeded(sentence_csv):
    first = assets.load_dataset_dict("csv", data_files={"train": str(sentence_csv)})
    again = assets.load_dataset_dict("csv", data_files={"train": str(sentence_csv)})
    other = assets.load_dataset_dict("csv", data_files={"train": str(sentence_csv)}, split_seed=5)

    assert first["test"]["text"] == again["test"]["text"]
    assert first["test"]["text"] != other["test"]["text"]


def test_hub_path_keeps_existing_splits(tmp_path, sentence_csv):
    test_csv = tmp_path / "test.csv"
    test_csv.write_text("sentence,label\nheld out,1\nalso held out,0\n")
    splits = assets.load_dataset_dict("csv", data_files={"train": str(sentence_csv), "test": str(test_csv)})

    assert splits["test"]["text"] == ["held out", "also held out"]
    assert splits.num_rows == {"train": 45, "validation": 5, "test": 2}


def test_hub_path_renames_named_columns(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("review,stars\n" + "".join(f"review {i},{i % 3}\n" for i in range(30)))
    splits = assets.load_dataset_dict("csv", data_files=str(path), text_column="review", label_column="stars")

    assert splits["train"].column_names == ["text", "label"]
    assert splits.num_rows == {"train": 24, "validation": 3, "test": 3}


def test_hub_path_max_samples(sentence_csv):
    splits = assets.load_dataset_dict("csv", data_files=str(sentence_csv), max_samples_per_split=3)
    assert splits.num_rows == {"train": 3, "validation": 3, "test": 3}


def test_hub_path_missing_columns(tmp_path):
    path = tmp_path / "plain.csv"
    path.write_text("body,score\nx,1\ny,0\n")
    with pytest.raises(ValueError, match="needs a label column"):
        assets.load_dataset_dict("csv", data_files=str(path))
    with pytest.raises(ValueError, match="no column 'review'"):
        assets.load_dataset_dict("csv", data_files=str(path), text_column="review")


def test_hub_path_rejects_split_argument(sentence_csv):
    with pytest.raises(ValueError, match="split is not supported"):
        assets.load_dataset_dict("csv", data_files=str(sentence_csv), split="train")


def test_hub_path_warns_on_unlabelled_test(tmp_path, sentence_csv, caplog):
    test_csv = tmp_path / "test.csv"
    test_csv.write_text("sentence,label\nheld out,-1\nalso held out,-1\n")
    with caplog.at_level("WARNING", logger="hf_dp_microadam.assets.data"):
        assets.load_dataset_dict("csv", data_files={"train": str(sentence_csv), "test": str(test_csv)})
    assert "unlabelled" in caplog.text


def test_unreachable_hub_dataset_lists_offline_names():
    # tests/conftest.py sets HF_DATASETS_OFFLINE=1, so the hub is never contacted.
    with pytest.raises(UnknownAssetError) as raised:
        assets.load_dataset_dict("no-such-dataset-xyz")
    message = str(raised.value)
    assert "'no-such-dataset-xyz'" in message
    assert "fashion-mnist, rotten-tomatoes" in message
