"""Hugging Face `datasets` data (`data.source: hfds`): small real datasets built here (scikit-learn's digits
and the CIFAR-10 JPEGs of data/cifar10-small as PIL images, `Dataset.from_dict` + `save_to_disk`, parquet and
arrow files), read lazily, with columns, splits, class names and colour found from the data; the split
fingerprint, keyed views and the teacher cache, on-device decoding; unlabelled rows and splits that reach the
student and never the teacher; a whole pipeline whose validation accuracy an independent evaluation of the
student's checkpoint confirms; a one-line error for each bad input, including a Hub name offline."""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from datasets import Image as HFImage

from distill import DistillationLoss, DistillModule, ImageDataModule, TeacherModule

REPO = Path(__file__).resolve().parent.parent
CIFAR = REPO / "data" / "cifar10-small"
CIFAR_CLASSES = ["airplane", "automobile", "bird"]
needs_cifar = pytest.mark.skipif(not (CIFAR / "train").is_dir(), reason="data/cifar10-small is not here")
TINY_TEACHER = dict(model="cifar_resnet10", model_kwargs={"base_width": 8})
TINY_STUDENT = dict(patch_size=2, embed_dim=32, depth=1, num_heads=2, drop_path_rate=0.0)


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """datasets converts parquet/arrow files into its cache: this test's folder, not the user's; no bars."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


# ---------------------------------------------------------------------------------------- real data
def _digits(classes=3, start=0, count=10):
    """`count` real digits per class (8x8 uint8 arrays) from scikit-learn, from the `start`-th of each class."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images * (255 / 16)).round().astype(np.uint8)
    picks = [(i, c) for c in range(classes) for i in np.flatnonzero(d.target == c)[start:start + count]]
    return [images[i] for i, _ in picks], [c for _, c in picks]


def _png(array) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _features(names, label=True):
    return Features({"image": HFImage(), **({"label": ClassLabel(names=names)} if label else {})})


def _digits_split(classes=3, start=0, count=10, labels=None) -> Dataset:
    """Real digits as PIL images (stored PNG-encoded) with a ClassLabel named 0..classes-1."""
    arrays, true = _digits(classes, start, count)
    data = {"image": [Image.fromarray(a) for a in arrays], "label": true if labels is None else labels}
    return Dataset.from_dict(data, features=_features([str(c) for c in range(classes)]))


def _listing(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns) for p in folder.rglob("*"))


def _digits_dict(tmp_path, name="digits", train=10, val=4, **more) -> Path:
    """A DatasetDict of real digits (3 classes): train/validation (+ the splits in `more`), saved to disk."""
    splits = dict(train=_digits_split(count=train), validation=_digits_split(start=train, count=val), **more)
    DatasetDict(splits).save_to_disk(str(tmp_path / name))
    return tmp_path / name


def _cifar_split(split, count, classes=CIFAR_CLASSES) -> tuple[Dataset, list[Path]]:
    """`count` CIFAR-10 JPEGs per class of data/cifar10-small/<split> as PIL images (their files' bytes are
    stored), with their files in the order an image folder lists them."""
    files = [(f, c) for c, name in enumerate(classes) for f in sorted((CIFAR / split / name).iterdir())[:count]]
    images = [Image.open(f) for f, _ in files]
    ds = Dataset.from_dict({"image": images, "label": [c for _, c in files]}, features=_features(classes))
    return ds, [f for f, _ in files]


def _decodes(monkeypatch) -> list[int]:
    """Counts the images datasets decodes (one entry per decode)."""
    calls: list[int] = []
    decode = HFImage.decode_example

    def counted(self, value, token_per_repo_id=None):
        calls.append(1)
        return decode(self, value, token_per_repo_id)

    monkeypatch.setattr(HFImage, "decode_example", counted)
    return calls


# ----------------------------------------------------------------------------------------- reading
@needs_cifar
def test_a_save_to_disk_folder_serves_the_images_an_image_folder_of_the_same_files_does(tmp_path, monkeypatch):
    """CIFAR JPEGs as a DatasetDict (train, validation, test) and as an image folder: the same classes,
    colour, statistics and pixels; memory-mapped, the image column alone read, one image decoded per item."""
    train, train_files = _cifar_split("train", 6)
    val, val_files = _cifar_split("test", 3)
    DatasetDict(train=train, validation=val, test=val.select(range(3))).save_to_disk(str(tmp_path / "hf"))
    for split, files in (("train", train_files), ("val", val_files)):
        for f in files:
            (tmp_path / "folder" / split / f.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, tmp_path / "folder" / split / f.parent.name / f.name)
    hf = ImageDataModule("hfds", root=str(tmp_path / "hf"), img_size=16, batch_size=4)
    folder = ImageDataModule("imagefolder", root=str(tmp_path / "folder"), img_size=16, batch_size=4)
    assert hf.class_names == folder.class_names == CIFAR_CLASSES and hf.in_chans == folder.in_chans == 3
    assert hf.mean == pytest.approx(folder.mean) and hf.std == pytest.approx(folder.std)
    hf.setup()
    folder.setup()
    assert len(hf.train_set) == 18 and len(hf.val_set) == 9 and len(hf.test_set) == 3  # the test split is its own
    assert hf.train_set.targets == folder.train_set.targets
    for i in (0, 4, 8):
        assert torch.equal(hf.val_set[i][0], folder.val_set[i][0]) and hf.val_set[i][1] == folder.val_set[i][1]
    # lazy: memory-mapped from the saved folder, the image column alone, nothing decoded until an item is read
    table = hf.train_set.table
    assert table.column_names == ["image"] and Path(table.cache_files[0]["filename"]).parent == tmp_path / "hf" / "train"
    decodes = _decodes(monkeypatch)
    lazy = ImageDataModule("hfds", root=str(tmp_path / "hf"), img_size=16, batch_size=4, mean=[0.5] * 3, std=[0.5] * 3)
    lazy.setup()
    assert decodes == []
    lazy.train_set[5]
    assert len(decodes) == 1


def test_grayscale_digits_in_one_split_with_an_integer_label_column(tmp_path, caplog):
    """A plain Dataset (no splits) of real digits whose labels are integers without class names: one
    channel, classes named 0..2 with a note, data.val_fraction of it held out (stratified, by data.seed)."""
    _digits_split(count=8).rename_column("label", "digit").cast_column("digit", Value("int64")).save_to_disk(str(tmp_path / "plain"))
    with caplog.at_level(logging.WARNING, logger="distill.data.hf_datasets"):
        dm = ImageDataModule("hfds", root=str(tmp_path / "plain"), label_key="digit", val_fraction=0.25, batch_size=4)
        assert dm.class_names == ["0", "1", "2"] and dm.in_chans == 1
    assert "no ClassLabel feature" in caplog.text
    dm.setup()
    assert len(dm.train_set) == 18 and len(dm.val_set) == 6 and sorted(dm.val_set.targets) == [0, 0, 1, 1, 2, 2]
    assert dm.test_set is dm.val_set and tuple(dm.train_set[0][0].shape) == (1, 8, 8)
    assert set(dm.train_set.rows.tolist()).isdisjoint(dm.val_set.rows.tolist())
    other = ImageDataModule("hfds", root=str(tmp_path / "plain"), label_key="digit", val_fraction=0.25, seed=1)
    ours, theirs = dm.split_fingerprint, other.split_fingerprint
    assert ours["dataset"] == theirs["dataset"] and ours["val"] != theirs["val"]


def test_parquet_and_arrow_folders_take_their_splits_from_file_and_folder_names(tmp_path):
    train, val = _digits_split(count=6), _digits_split(start=6, count=3)
    train.to_parquet(str(tmp_path / "files" / "train.parquet"))  # train.parquet + test.parquet
    val.to_parquet(str(tmp_path / "files" / "test.parquet"))
    for name, ds in (("train", train), ("validation", val), ("test", val.select(range(2)))):  # split folders, shards
        for k, shard in enumerate((ds.select(range(0, len(ds), 2)), ds.select(range(1, len(ds), 2)))):
            shard.to_parquet(str(tmp_path / "folders" / name / f"{k}.parquet"))
    DatasetDict(train=train, validation=val).save_to_disk(str(tmp_path / "saved"))
    for split in ("train", "validation"):  # the arrow files save_to_disk wrote, under split names
        (tmp_path / "arrow").mkdir(exist_ok=True)
        shutil.copy(next((tmp_path / "saved" / split).glob("*.arrow")), tmp_path / "arrow" / f"{split}-00000.arrow")
    for root, sizes in (("files", (18, 9, 9)), ("folders", (18, 9, 2)), ("arrow", (18, 9, 9))):
        dm = ImageDataModule("hfds", root=str(tmp_path / root), batch_size=4)
        dm.setup()
        assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == sizes, root
        assert dm.class_names == ["0", "1", "2"] and dm.in_chans == 1, root  # the ClassLabel survives the files
        assert sorted(dm.train_set.targets) == sorted(train["label"]), root
    # the same images and labels as parquet or arrow files: the same data to the leakage check
    train.to_parquet(str(tmp_path / "same" / "train.parquet"))
    val.to_parquet(str(tmp_path / "same" / "validation.parquet"))
    saved = ImageDataModule("hfds", root=str(tmp_path / "saved")).split_fingerprint
    assert ImageDataModule("hfds", root=str(tmp_path / "arrow")).split_fingerprint == saved
    assert ImageDataModule("hfds", root=str(tmp_path / "same")).split_fingerprint == saved


def test_columns_and_splits_are_chosen_by_name(tmp_path):
    arrays, labels = _digits(count=4)
    images = [Image.fromarray(a) for a in arrays]
    features = Features({"photo": HFImage(), "thumb": HFImage(), "fine": ClassLabel(names=["a", "b", "c"]),
                         "coarse": ClassLabel(names=["low", "high"])})
    ds = Dataset.from_dict({"photo": images, "thumb": images[::-1], "fine": labels, "coarse": [min(t, 1) for t in labels]},
                           features=features)
    DatasetDict(fit=ds, held=ds.select(range(6)), extra=ds.select(range(3))).save_to_disk(str(tmp_path / "two"))
    dm = ImageDataModule("hfds", root=str(tmp_path / "two"), image_key="thumb", label_key="coarse", train_split="fit",
                         val_split="held", batch_size=4)
    dm.setup()
    assert dm.class_names == ["low", "high"] and dm.train_set.targets == [min(t, 1) for t in labels]
    assert torch.equal(dm.train_set[0][0], dm.train_set.transform(images[-1]))  # the thumb column
    assert len(dm.val_set) == 6 and dm.test_set is dm.val_set


# --------------------------------------------------------------------------------------- bad input
def _one_line(error, *args, match: str, **kwargs):
    with pytest.raises(error, match=match) as e:
        dm = ImageDataModule(*args, **kwargs)
        dm.setup()
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


def test_every_bad_input_is_one_line_and_writes_nothing(tmp_path):
    arrays, labels = _digits(count=4)
    images = [Image.fromarray(a) for a in arrays]
    written: dict[Path, list] = {}

    def save(name, splits):
        DatasetDict(splits).save_to_disk(str(tmp_path / name))
        written[tmp_path / name] = _listing(tmp_path / name)
        return str(tmp_path / name)

    good = _digits_split(count=4)
    texts = save("texts", dict(train=Dataset.from_dict({"text": ["x"] * 12, "label": labels}),
                               validation=Dataset.from_dict({"text": ["x"] * 3, "label": labels[:3]})))
    _one_line(ValueError, "hfds", root=texts, match=r"data.source hfds: no Image column among text \(Value string\), "
                                                    r"label \(Value int64\); set data.image_key")
    twice = save("twice", dict(train=Dataset.from_dict({"a": images, "b": images, "label": labels},
                                                       features=Features({"a": HFImage(), "b": HFImage(),
                                                                          "label": ClassLabel(names=["0", "1", "2"])})),
                               validation=good))
    _one_line(ValueError, "hfds", root=twice, match=r"2 Image columns \(a, b\); set data.image_key")
    _one_line(ValueError, "hfds", root=twice, image_key="c", match=r"data.image_key='c' is not a column of the data; "
                                                                    r"its columns: a \(Image\), b \(Image\), label")
    unnamed = save("unnamed", dict(train=Dataset.from_dict({"image": images, "y": labels},
                                                           features=Features({"image": HFImage(), "y": Value("int64")})),
                                   validation=good))
    _one_line(ValueError, "hfds", root=unnamed, match=r"no ClassLabel column among image \(Image\), y \(Value int64\); "
                                                      r"set data.label_key")
    single = Dataset.from_dict({"image": images, "label": [0] * 12}, features=_features(["only"]))
    _one_line(ValueError, "hfds", root=save("single", dict(train=single, validation=single)),
              match=r"data.label_key='label': its ClassLabel names 1 class\(es\); at least 2 are needed")
    # labels: past the class names, below -1, missing on a validation row, or on every training row
    high = Dataset.from_dict({"image": images[:3], "label": [0, 5, 1]},
                             features=Features({"image": HFImage(), "label": Value("int64")}))
    _one_line(ValueError, "hfds", root=save("high", dict(train=good, validation=high)),
              match=r"data.label_key='label': 1 label\(s\) of split 'validation' lie outside 0..2 \(the 3 classes\), "
                    r"e.g. row 1: 5; fix the labels")
    low = Dataset.from_dict({"image": images, "y": [-2] + labels[1:]},
                            features=Features({"image": HFImage(), "y": Value("int64")}))
    _one_line(ValueError, "hfds", root=save("low", dict(train=low, validation=low)), label_key="y",
              match=r"split 'train' lie outside 0..2 .* e.g. row 0: -2; .*\(-1 or None marks an unlabelled training row\)")
    none = Dataset.from_dict({"image": images[:3], "label": [0, None, 1]}, features=_features(["0", "1", "2"]))
    _one_line(ValueError, "hfds", root=save("none", dict(train=good, validation=none)),
              match=r"split 'validation' .* e.g. row 1: none; .*every validation/test row needs a label")
    blank = Dataset.from_dict({"image": images, "label": [None] * 12}, features=_features(["0", "1", "2"]))
    _one_line(ValueError, "hfds", root=save("blank", dict(train=blank, validation=good)),
              match=r"data.train_split='train': no row has a label; the teacher needs labelled images")
    # splits: empty, unknown, none to validate on
    _one_line(ValueError, "hfds", root=save("empty", dict(train=good, validation=good.select([]))),
              match=r"data.val_split='validation': the split holds no rows")
    good.to_parquet(str(tmp_path / "parquet" / "train.parquet"))
    good.select([]).to_parquet(str(tmp_path / "parquet" / "test.parquet"))
    _one_line(ValueError, "hfds", root=str(tmp_path / "parquet"), match=r"data.val_split='test': the split holds no rows")
    _one_line(ValueError, "hfds", root=str(tmp_path / "empty"), train_split="training",
              match=r"data.train_split='training' is not a split of the data; its splits: train, validation")
    _one_line(ValueError, "hfds", root=save("other", dict(train=good, dev=good)),
              match=r"no validation or test split among train, dev; set data.val_split")
    # roots and options
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("no data here")
    _one_line(ValueError, "hfds", root=str(tmp_path / "plain"), match=r"holds no save_to_disk dataset .* and no "
                                                                      r"\.parquet or \.arrow files")
    _one_line(ValueError, "hfds", root=str(tmp_path / "a" / "b" / "c"), match=r"is neither a folder .* nor a Hub dataset")
    _one_line(ValueError, "hfds", match=r"data.root is required for data.source=hfds")
    _one_line(ValueError, "digits", image_key="img", match=r"data.image_key applies to data.source hfds only")
    _one_line(ValueError, "hfds", root=texts, unlabeled_split="u", unlabeled_root=str(tmp_path),
              match=r"data.unlabeled_split and data.unlabeled_root both add unlabelled images; use one of them")
    _one_line(ValueError, "hfds", root=str(tmp_path / "empty"), unlabeled_split="train",
              match=r"must name different splits")
    _one_line(ValueError, "hfds", root=save("full", dict(train=good, validation=good)), labeled_fraction=0.5,
              match=r"data.labeled_fraction needs unlabelled images, and every row of split 'train' has a label")
    # nothing written into (or changed in) the user's folders: no cache or index file next to their data
    assert written and all(_listing(folder) == files for folder, files in written.items())
    assert _listing(tmp_path / "plain") == [("notes.txt", (tmp_path / "plain" / "notes.txt").stat().st_mtime_ns)]


def test_an_undecodable_image_is_replaced_by_the_next_up_to_max_bad_fraction(tmp_path):
    arrays, labels = _digits(count=8)
    stored = [{"bytes": _png(a), "path": None} for a in arrays]
    stored[7] = {"bytes": b"not an image", "path": None}  # the last 0; row 8 is the first 1
    broken = Dataset.from_dict({"image": stored, "label": labels}, features=_features(["0", "1", "2"]))
    DatasetDict(train=broken, validation=_digits_split(start=8, count=2)).save_to_disk(str(tmp_path / "broken"))
    dm = ImageDataModule("hfds", root=str(tmp_path / "broken"), max_bad_fraction=0.1, batch_size=4)
    dm.setup()
    x, y = dm.train_set[7]
    assert torch.equal(x, dm.train_set[8][0]) and (y, labels[8]) == (1, 1)  # the next image, with its own label
    _one_line(ValueError, "hfds", root=str(tmp_path / "broken"), batch_size=4,
              match=r"data.root: 1 of 24 images of split 'train' cannot be decoded \(e.g. row 7 of split 'train': .*\), "
                    r"above data.max_bad_fraction=0.01; fix or remove them")


def test_without_the_datasets_library_hfds_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # `import datasets` fails
    _one_line(ImportError, "hfds", root=str(tmp_path), match=r"data.source hfds needs the Hugging Face datasets "
                                                             r"library: pip install 'distill\[hf\]'")


# ----------------------------------------------------------------------------------------- the Hub
def _cached_hub_copy(tmp_path, repo: str) -> None:
    """Puts `repo` into datasets' local cache as a download would have (the cache layout of datasets 3-5:
    <cache>/<org>___<name>/default/0.0.0/<hash>/<name>-<split>.arrow + dataset_info.json)."""
    _digits_split(count=6).to_parquet(str(tmp_path / "src" / "train.parquet"))
    _digits_split(start=6, count=2).to_parquet(str(tmp_path / "src" / "test.parquet"))
    datasets.load_dataset("parquet", data_dir=str(tmp_path / "src"))
    built = next(p for p in (tmp_path / "hf-cache" / "parquet").glob("*/0.0.0/*") if p.is_dir())
    org, name = repo.split("/")
    copy = tmp_path / "hf-cache" / f"{org}___{name}" / "default" / "0.0.0" / built.name
    shutil.copytree(built, copy)
    for f in copy.glob("parquet-*.arrow"):
        f.rename(copy / f.name.replace("parquet-", f"{name}-"))


def test_a_hub_name_is_read_from_the_local_cache_or_fails_fast_in_one_line(tmp_path, monkeypatch):
    import distill.data.hf_datasets as hf

    seen = []
    load = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: (seen.append(datasets.config.HF_HUB_OFFLINE), load(*a, **k))[1])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    text = _one_line(FileNotFoundError, "hfds", root="someorg/missing-set",
                     match=r"data.root: 'someorg/missing-set' is not a folder here, so it names a Hub dataset, which is "
                           r"not in the local datasets cache and HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set; download it "
                           r"where there is network \(datasets.load_dataset\('someorg/missing-set'\).save_to_disk\(DIR\)\)")
    assert "point data.root at a local copy" in text and time.perf_counter() - start < 10 and seen == [True]
    # not offline, but the Hub cannot be reached: the cache is read at once, never the network
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf, "hub_reachable", lambda: (False, "OSError: no route to host"))
    _one_line(FileNotFoundError, "hfds", root="someorg/missing-set",
              match=r"which is not in the local datasets cache and the Hub cannot be reached \(OSError: no route to host\)")
    assert seen == [True, True] and datasets.config.HF_HUB_OFFLINE is False  # offline for that one call only
    _cached_hub_copy(tmp_path, "someorg/tinydigits")
    dm = ImageDataModule("hfds", root="someorg/tinydigits", batch_size=4)
    dm.setup()
    assert len(dm.train_set) == 18 and len(dm.val_set) == 6 and dm.class_names == ["0", "1", "2"]
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert len(ImageDataModule("hfds", root="someorg/tinydigits").class_names) == 3


# ------------------------------------------------------------------------- fingerprints, views, cache
def test_the_split_fingerprint_names_the_data_and_its_rows_wherever_it_lies(tmp_path):
    root = _digits_dict(tmp_path, test=_digits_split(start=14, count=2))
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    fp = ImageDataModule("hfds", root=str(root)).split_fingerprint
    assert ImageDataModule("hfds", root=str(copy)).split_fingerprint == fp and fp["train"] == fp["labeled"]
    assert ImageDataModule("hfds", root=str(root), val_split="test").split_fingerprint["val"] != fp["val"]
    kept = ImageDataModule("hfds", root=str(root), labels_per_class=2).split_fingerprint
    assert kept["labeled"] != kept["train"] == fp["train"]
    labels = _digits(count=10)[1]
    labels[3] = (labels[3] + 1) % 3  # one label changed
    DatasetDict(train=_digits_split(count=10, labels=labels), validation=_digits_split(start=10, count=4),
                test=_digits_split(start=14, count=2)).save_to_disk(str(tmp_path / "relabelled"))
    assert ImageDataModule("hfds", root=str(tmp_path / "relabelled")).split_fingerprint["dataset"] != fp["dataset"]
    other_image = DatasetDict(train=_digits_split(count=10), validation=_digits_split(start=11, count=4),
                              test=_digits_split(start=14, count=2))
    other_image.save_to_disk(str(tmp_path / "other"))
    assert ImageDataModule("hfds", root=str(tmp_path / "other")).split_fingerprint["dataset"] != fp["dataset"]


def test_a_student_that_would_validate_on_its_teachers_training_rows_is_refused(tmp_path, trainer_factory):
    root = _digits_dict(tmp_path, test=_digits_split(start=14, count=2))
    teacher_trainer = trainer_factory(max_steps=1, limit_val_batches=0)
    teacher_trainer.fit(TeacherModule(**TINY_TEACHER), ImageDataModule("hfds", root=str(root), batch_size=8))
    teacher_trainer.save_checkpoint(tmp_path / "teacher.ckpt")

    def student(**data):
        module = DistillModule(student=dict(TINY_STUDENT), teacher=str(tmp_path / "teacher.ckpt"), warmup_epochs=0)
        trainer_factory(max_steps=1, limit_val_batches=0).fit(module, ImageDataModule("hfds", batch_size=8, **data))

    student(root=str(tmp_path / "digits"))
    copy = shutil.copytree(root, tmp_path / "copy")
    student(root=str(copy))  # the same data elsewhere: the same split
    with pytest.raises(ValueError, match=r"model.teacher was trained on another train/validation split of this data"):
        student(root=str(copy), val_split="test")
    with pytest.raises(ValueError, match=r"model.teacher was trained on other labelled images of this data"):
        student(root=str(copy), labels_per_class=3)


def test_keyed_views_and_the_teacher_cache_on_hfds_data_with_unlabelled_rows(tmp_path, trainer_factory):
    from distill.teacher.cache import TeacherCache, TeacherCacheConfig, dataset_fingerprint

    train = _digits_split(count=10)
    unlabelled = Dataset.from_dict({"image": [Image.fromarray(a) for a in _digits(start=20, count=3)[0]],
                                    "label": [-1] * 9}, features=_features(["0", "1", "2"]))
    DatasetDict(train=datasets.concatenate_datasets([train, unlabelled]),
                validation=_digits_split(start=10, count=4)).save_to_disk(str(tmp_path / "hf"))
    teacher_trainer = trainer_factory(max_steps=2, limit_val_batches=0)
    teacher_trainer.fit(TeacherModule(**TINY_TEACHER), ImageDataModule("hfds", root=str(tmp_path / "hf"), batch_size=8))
    teacher_trainer.save_checkpoint(tmp_path / "teacher.ckpt")

    def fit(root):
        dm = ImageDataModule("hfds", root=str(root), batch_size=8, crop="pad", hflip=0.5, keyed_views=True,
                             view_epochs=1)
        module = DistillModule(student=dict(TINY_STUDENT), teacher=str(tmp_path / "teacher.ckpt"), warmup_epochs=0,
                               loss=DistillationLoss("soft"),
                               teacher_cache=TeacherCacheConfig(dir=str(tmp_path / "cache"), verify_batches=2))
        trainer_factory(max_epochs=1, limit_train_batches=3, limit_val_batches=0).fit(module, dm)
        return module, dm

    module, dm = fit(tmp_path / "hf")
    assert dm.num_unlabeled == 9 and len(dm.train_set) == 39
    cache = TeacherCache(tmp_path / "cache")
    assert cache.manifest["data"] == dataset_fingerprint(dm.train_set, dm.class_names)
    assert module.teacher.cache is not None and module.teacher.cache.to_verify == 0  # replayed views match the teacher
    module, _ = fit(tmp_path / "hf")  # read back, verified again
    assert module.teacher.cache.to_verify == 0
    # another unlabelled image behind the same keys: other data to the cache
    swapped = Dataset.from_dict({"image": [Image.fromarray(a) for a in _digits(start=23, count=3)[0]],
                                 "label": [-1] * 9}, features=_features(["0", "1", "2"]))
    DatasetDict(train=datasets.concatenate_datasets([train, swapped]),
                validation=_digits_split(start=10, count=4)).save_to_disk(str(tmp_path / "swapped"))
    with pytest.raises(ValueError, match="data differs"):
        fit(tmp_path / "swapped")


@needs_cifar
def test_on_device_decoding_and_worker_processes_read_hfds_data(tmp_path):
    from distill.data.device_loader import device_loader

    train, train_files = _cifar_split("train", 4)
    val, _ = _cifar_split("test", 2)
    DatasetDict(train=train, validation=val).save_to_disk(str(tmp_path / "hf"))
    dm = ImageDataModule("hfds", root=str(tmp_path / "hf"), img_size=32, batch_size=4, on_device=True)
    dm.setup()
    device_loader(dm, "train")
    images, targets = next(iter(dm._device_decoded.values()))
    expected = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in train_files])
    assert torch.equal(images, expected) and targets.tolist() == train["label"]  # the JPEGs, decoded once
    assert dm.train_set[0][0].dtype == torch.float32  # the host set keeps its own (normalising) transform
    host = ImageDataModule("hfds", root=str(tmp_path / "hf"), img_size=32, batch_size=4, num_workers=2,
                           persistent_workers=False)
    host.setup()
    seen = torch.cat([y for _, y in host.val_dataloader()])  # two worker processes open the memory map again
    assert seen.tolist() == val["label"]


def test_on_device_decoding_of_labelled_and_unlabelled_rows(tmp_path):
    """Digits with rows without a label and an unlabelled split, decoded once onto the device through the
    training set's own items: the digits' pixels, in the training set's order, -1 for the unlabelled ones."""
    from distill.data.device_loader import device_loader

    root = _semi_supervised(tmp_path)
    dm = ImageDataModule("hfds", root=str(root), img_size=8, batch_size=4, on_device=True, unlabeled_split="unlabeled")
    dm.setup()
    loader = device_loader(dm, "train")
    images, targets = next(iter(dm._device_decoded.values()))
    arrays = _digits(count=8)[0] + _digits(start=8, count=2)[0] + _digits(start=10, count=2)[0]
    assert torch.equal(images, torch.from_numpy(np.stack(arrays))[:, None])
    assert targets.tolist() == _digits(count=8)[1] + [-1] * 12 and len(loader) == 36 // 4


# --------------------------------------------------------------------------------- unlabelled images
def _semi_supervised(tmp_path, duplicate_of_val: bool = False, labelled: int = 8, val: int = 2) -> Path:
    """Real digits: a training split with `labelled` rows a class, then 4 rows whose label is None and 2
    whose label is -1; a validation split (`val` a class) and an `unlabeled` split of 6 (whose labels, as
    a pool set aside from labelled data would have, are ignored)."""
    arrays = _digits(start=labelled, count=2)[0]
    if duplicate_of_val:
        arrays[0] = _digits(start=labelled + 4, count=1)[0][1]  # validation row `val` (the first of class 1)
    rows = Dataset.from_dict({"image": [Image.fromarray(a) for a in arrays], "label": [None] * 4 + [-1] * 2},
                             features=_features(["0", "1", "2"]))
    extra = _digits_split(start=labelled + 2, count=2)
    DatasetDict(train=datasets.concatenate_datasets([_digits_split(count=labelled), rows]),
                validation=_digits_split(start=labelled + 4, count=val),
                unlabeled=extra).save_to_disk(str(tmp_path / "semi"))
    return tmp_path / "semi"


def _labels_seen(module, dm, root):
    from conftest import make_trainer

    seen = []

    class Probe(__import__("lightning").Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(batch[1].clone())

    make_trainer(root, callbacks=[Probe()], limit_val_batches=0, max_epochs=1).fit(module, dm)
    return torch.cat(seen)


def test_unlabelled_rows_and_split_reach_the_student_and_never_the_teacher(tmp_path, caplog):
    root = _semi_supervised(tmp_path)
    data = dict(root=str(root), batch_size=6, drop_last=False)
    teacher = TeacherModule(**TINY_TEACHER)
    with caplog.at_level(logging.INFO, logger="distill.data.datamodule"):
        labels = _labels_seen(teacher, ImageDataModule("hfds", unlabeled_split="unlabeled", **data), tmp_path / "t")
    assert len(labels) == 24 and (labels >= 0).all()  # the 24 labelled rows, nothing else
    assert "6 training rows without a label and the images of data.unlabeled_split 'unlabeled'" in caplog.text
    dm = ImageDataModule("hfds", unlabeled_split="unlabeled", **data)
    student = DistillModule(student=dict(TINY_STUDENT), teacher=teacher.model, loss=DistillationLoss("hard"),
                            warmup_epochs=0)
    labels = _labels_seen(student, dm, tmp_path / "s")
    assert len(labels) == 24 + 6 + 6 and int((labels == -1).sum()) == 12 and dm.num_unlabeled == 12
    fp = dm.split_fingerprint
    assert fp["labeled"] != fp["train"]  # the rows without a label are training rows, not labelled ones
    assert ImageDataModule("hfds", root=str(root)).split_fingerprint == fp  # the teacher's view of the same data
    # labels_per_class draws among the labelled rows only; the rows without a label stay unlabelled
    dm = ImageDataModule("hfds", labels_per_class=2, **data)
    dm.setup()
    assert dm.train_set.num_labeled == 6 and dm.num_unlabeled == 24 + 6 - 6
    assert all(dm.train_set.targets[i] == -1 for i in range(24, 30))


def test_unlabelled_images_that_are_held_out_images_are_refused(tmp_path):
    root = _semi_supervised(tmp_path, duplicate_of_val=True)
    _one_line(ValueError, "hfds", root=str(root), batch_size=4,
              match=r"data.root: 1 of 6 training rows without a label are validation/test images too \(e.g. row 24 of "
                    r"split 'train' is row 2 of split 'validation'\); remove them from the data")
    # in an unlabelled split, and in an unlabelled folder next to hfds data
    val = _digits_split(start=20, count=2)
    stored = val.cast_column("image", HFImage(decode=False))["image"]  # the encoded bytes validation holds
    copied = Dataset.from_dict({"image": [stored[4], stored[1]]}, features=_features([], label=False))
    DatasetDict(train=_digits_split(count=8), validation=val, unlabeled=copied).save_to_disk(str(tmp_path / "split"))
    _one_line(ValueError, "hfds", root=str(tmp_path / "split"), unlabeled_split="unlabeled", batch_size=4,
              match=r"2 of 2 rows of data.unlabeled_split 'unlabeled' are validation/test images too \(e.g. row 0 of "
                    r"split 'unlabeled' is row 4 of split 'validation'\)")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "renamed.png").write_bytes(stored[3]["bytes"])
    Image.fromarray(_digits(start=30, count=1)[0][0]).save(tmp_path / "folder" / "new.png")
    _one_line(ValueError, "hfds", root=str(tmp_path / "split"), unlabeled_root=str(tmp_path / "folder"), batch_size=4,
              match=r"data.unlabeled_root: 1 of 2 unlabelled images are validation/test images too \(e.g. .*renamed.png "
                    r"is row 3 of split 'validation'\)")


# ---------------------------------------------------------------------------------------- pipeline
def test_a_pipeline_on_an_hfds_folder_validates_what_its_checkpoint_scores(tmp_path):
    """`distill pipeline` (teacher, then student) on a save_to_disk folder of real digits with unlabelled
    rows and an unlabelled split; the student's val/acc is what its checkpoint scores on the validation
    rows read with datasets alone."""
    from distill import load_student, student_heads
    from distill.commands.main import main
    from distill.data.transforms import build_eval_transform
    from distill.models.meta import eval_spec_of

    root = _semi_supervised(tmp_path, labelled=30, val=10)
    out = tmp_path / "run"
    code = main(["pipeline", str(REPO / "recipes/digits"), "--out", str(out),
                 "--data.source", "hfds", "--data.root", str(root), "--data.batch_size", "8",
                 "--student.data.unlabeled_split", "unlabeled",
                 "--trainer.max_epochs", "4", "--trainer.enable_progress_bar", "false",
                 "--trainer.enable_model_summary", "false", "--teacher.model.init_args.model", "cifar_resnet10",
                 "--student.model.init_args.student.depth", "1", "--student.model.init_args.student.embed_dim", "32"])
    assert code == 0
    import json

    summary = json.loads((out / "summary.json").read_text())
    student = load_student(summary["student"]["checkpoint"])
    transform = build_eval_transform(eval_spec_of(student))
    val = datasets.load_from_disk(str(root))["validation"]
    y = torch.tensor(val["label"])
    with torch.no_grad():
        x = torch.stack([transform(row["image"].convert("L")) for row in val])
        fused = student(x)
        z_cls, z_dist = student_heads(student, x)
    assert len(set(fused.argmax(-1).tolist())) > 1  # a student that tells classes apart: the comparison means something
    for key, logits in (("val/acc", fused), ("val/acc_cls", z_cls), ("val/acc_dist", z_dist)):  # three heads agree
        assert summary["student"][key] == pytest.approx((logits.argmax(-1) == y).float().mean().item(), abs=1e-6), key
    teacher_hp = torch.load(summary["teacher"]["checkpoint"], map_location="cpu", weights_only=True)["hyper_parameters"]
    assert teacher_hp["class_names"] == ["0", "1", "2"] and teacher_hp["in_chans"] == 1
    assert teacher_hp["data_split"]["labeled"] != teacher_hp["data_split"]["train"]  # trained on the labelled rows
