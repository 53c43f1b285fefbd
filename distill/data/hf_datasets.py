"""Hugging Face `datasets` data (`data.source: hfds`): a `save_to_disk` folder (a DatasetDict or a
Dataset), a folder of parquet or arrow files, or a Hub name `ORG/NAME[@REVISION]`, read where it lies.

`HFImageSource` opens the data once and finds what `ImageDataModule` needs: the image and label
columns (the one `Image` feature, the one `ClassLabel` feature, or `data.image_key` / `data.label_key`),
the class names, the training / validation / test / unlabelled splits, the colour mode and the split
fingerprint. `HFImageDataset` serves one split as the toolkit's other datasets do (`targets`,
`transform`, `(image, label)` items), so everything downstream (keyed views, the teacher cache,
samplers, on-device decoding, unlabelled images) works unchanged.

Reading is lazy: arrow files are memory-mapped by `datasets`, the label column is read once (one
column), and an item decodes one image, read from the image column alone with decoding off
(`Image(decode=False)`: the stored bytes, decoded here), so the encoded bytes also serve the
fingerprints and the duplicate checks without decoding anything.

Rows whose label is -1 or None in the training split are unlabelled images (semi-supervised sets keep
them so), as is every row of `data.unlabeled_split`: `ImageDataModule` serves them with label -1 through
`distill.data.unlabeled.WithUnlabeled`, like `data.unlabeled_root`, so the teacher never sees them.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

UNLABELED = -1  # as distill.data.unlabeled.UNLABELED (not imported: that module reads image folders)
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")  # ORG/NAME[@REVISION]
CONNECT_TIMEOUT_S = 3.0
MODE_SAMPLE = 2_000  # images opened (headers only) to tell grayscale from colour data
FINGERPRINT_SAMPLE = 64  # images per split whose bytes go into the `dataset` fingerprint
Part = Literal["train", "val", "test", "unlabeled"]


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ImportError("data.source hfds needs the Hugging Face datasets library: pip install 'distill[hf]' "
                          "(or pip install datasets)") from None
    return datasets


def _spread(n: int, k: int) -> np.ndarray:
    """Up to k positions spread evenly over range(n)."""
    return np.unique(np.linspace(0, n - 1, num=min(n, k)).round().astype(np.int64)) if n else np.zeros(0, np.int64)


# ------------------------------------------------------------------------------------------ opening
def open_splits(root: str) -> dict[str, Any]:
    """The splits (name -> `datasets.Dataset`) of data.root: a `save_to_disk` folder (a DatasetDict, a
    Dataset = one split `train`, or split sub-folders each saved by `save_to_disk`), a folder of parquet
    or arrow files (splits from file and folder names, as `datasets` infers them), one such file, or a
    Hub name."""
    _datasets()  # the missing library is the first thing to say
    path = Path(root).expanduser()
    if path.is_dir():
        return _open_folder(path)
    if path.is_file() and path.suffix in (".parquet", ".arrow"):
        return _load_files(path.parent, path.suffix[1:], {"train": [str(path)]})
    if HUB_NAME.match(str(root)) and not path.exists():
        return _load_hub(str(root))
    raise ValueError(f"data.root: {str(root)!r} is neither a folder (save_to_disk, parquet or arrow files), a parquet/"
                     f"arrow file nor a Hub dataset name ORG/NAME; fix data.root")


def _open_folder(path: Path) -> dict[str, Any]:
    if (path / "dataset_dict.json").is_file():
        names = json.loads((path / "dataset_dict.json").read_text())["splits"]
        return {str(name): _load_saved(path / name) for name in names}
    if (path / "state.json").is_file():
        return {"train": _load_saved(path)}
    saved = sorted(p for p in path.iterdir() if (p / "state.json").is_file())
    if saved:  # split folders each written by Dataset.save_to_disk
        return {p.name: _load_saved(p) for p in saved}
    kinds = [k for k in ("parquet", "arrow") if next(path.rglob(f"*.{k}"), None) is not None]
    if not kinds:
        raise ValueError(f"data.root: {str(path)!r} holds no save_to_disk dataset (dataset_dict.json or state.json) and "
                         f"no .parquet or .arrow files; give the folder Dataset.save_to_disk or to_parquet wrote")
    if len(kinds) > 1:
        raise ValueError(f"data.root: {str(path)!r} holds both .parquet and .arrow files; keep one kind in the folder")
    from datasets.data_files import DataFilesDict, get_data_patterns

    kind = kinds[0]
    found = DataFilesDict.from_patterns(get_data_patterns(str(path)), base_path=str(path))
    files = {str(split): [f for f in names if f.endswith(f".{kind}")] for split, names in found.items()}
    return _load_files(path, kind, {split: names for split, names in files.items() if names})


def _empty() -> Any:
    """A split without rows (datasets cannot open one: it is refused when read, in one line)."""
    return _datasets().Dataset.from_dict({})


def _load_saved(path: Path) -> Any:
    """One folder of Dataset.save_to_disk, memory-mapped; an empty split (no data file) as `_empty()`."""
    try:
        if not json.loads((path / "state.json").read_text()).get("_data_files"):
            return _empty()
        return _datasets().load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - a damaged folder, said in one line
        raise ValueError(f"data.root: {str(path)!r} could not be opened as a save_to_disk folder ({type(e).__name__}: "
                         f"{_first_line(e)}); save it again with Dataset.save_to_disk") from None


def _num_rows(file: str, kind: str) -> int:
    if kind == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(file).metadata.num_rows
    return len(_datasets().Dataset.from_file(file))  # memory-mapped, nothing copied


def _load_files(path: Path, kind: str, data_files: dict[str, list[str]]) -> dict[str, Any]:
    # datasets converts the files once into arrow files in its cache (HF_DATASETS_CACHE) and
    # memory-maps those; a later run finds them there. It cannot load a split without rows.
    try:
        rows = {split: sum(_num_rows(f, kind) for f in files) for split, files in data_files.items()}
        filled = {split: files for split, files in data_files.items() if rows[split]}
        loaded = _datasets().load_dataset(kind, data_files=filled) if filled else {}
    except Exception as e:  # noqa: BLE001 - schema, corrupt-file and type errors alike, said in one line
        raise ValueError(f"data.root: the {kind} files under {str(path)!r} could not be read ({type(e).__name__}: "
                         f"{_first_line(e)}); check them with datasets.load_dataset({kind!r}, data_files=...)") from None
    return {split: (loaded[split] if split in filled else _empty()) for split in data_files}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ------------------------------------------------------------------------------------------ the Hub
def _offline() -> bool:
    """HF_DATASETS_OFFLINE or HF_HUB_OFFLINE, from the environment now or from the libraries' settings."""
    flags = [os.environ.get(v, "").strip().lower() for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")]
    if any(f in ("1", "true", "yes", "on") for f in flags):
        return True
    return bool(_datasets().config.HF_HUB_OFFLINE)


def hub_reachable() -> tuple[bool, str]:
    """(True, "") when one TCP connection to the Hub's endpoint (datasets' HF_ENDPOINT) succeeds within
    CONNECT_TIMEOUT_S."""
    from ..network import endpoint_reachable

    return endpoint_reachable(_datasets().config.HF_ENDPOINT, CONNECT_TIMEOUT_S)


@contextmanager
def _offline_mode(on: bool) -> Iterator[None]:
    """datasets (and huggingface_hub) in offline mode for one call: `load_dataset` then reads its local
    cache straight away instead of waiting for a network that is not there."""
    if not on:
        yield
        return
    from huggingface_hub import constants

    config = _datasets().config
    saved = config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _load_hub(name: str) -> dict[str, Any]:
    """A Hub dataset: from datasets' local cache, or downloaded when the Hub can be reached and
    offline mode is off. Never waits on a network that is not there."""
    repo, _, revision = name.partition("@")
    how = (f"download it where there is network (datasets.load_dataset({repo!r}).save_to_disk(DIR)) and set "
           f"data.root to DIR, or point data.root at a local copy (a save_to_disk folder or parquet files)")
    offline = _offline()
    reachable, reason = (False, "") if offline else hub_reachable()
    try:
        with _offline_mode(not reachable):
            loaded = _datasets().load_dataset(repo, revision=revision or None)
    except Exception as e:  # noqa: BLE001 - not cached, missing, gated, HTTP and connection errors alike
        if offline:
            why = "is not in the local datasets cache and HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set"
        elif not reachable:
            why = f"is not in the local datasets cache and the Hub cannot be reached ({reason})"
        else:
            why = f"could not be loaded from the Hub ({type(e).__name__}: {_first_line(e)})"
        raise FileNotFoundError(f"data.root: {name!r} is not a folder here, so it names a Hub dataset, which {why}; "
                                f"{how}") from None
    return {str(k): v for k, v in loaded.items()}


# ---------------------------------------------------------------------------------------- columns
def _kind(feature: Any) -> str:
    dtype = getattr(feature, "dtype", None)
    return f"{type(feature).__name__}" + (f" {dtype}" if type(feature).__name__ == "Value" and dtype else "")


def _columns(features: dict[str, Any]) -> str:
    return ", ".join(f"{k} ({_kind(f)})" for k, f in features.items()) or "none"


def _pick_column(features: dict[str, Any], given: str | None, kind: str, field: str, what: str) -> str:
    """The column named by `field` (data.image_key / data.label_key), else the one feature of `kind`."""
    if given is not None:
        if given not in features:
            raise ValueError(f"{field}={given!r} is not a column of the data; its columns: {_columns(features)}")
        return given
    found = [k for k, f in features.items() if type(f).__name__ == kind]
    if len(found) == 1:
        return found[0]
    if not found:
        raise ValueError(f"data.source hfds: no {kind} column among {_columns(features)}; set {field} to the column "
                         f"holding the {what}")
    raise ValueError(f"data.source hfds: {len(found)} {kind} columns ({', '.join(found)}); set {field} to the one "
                     f"holding the {what}")


# ----------------------------------------------------------------------------------------- source
class HFImageSource:
    """The splits of one `datasets` dataset as `ImageDataModule` reads them (see the module docstring).

    Args:
        root: data.root (folder, file or Hub name).
        image_key, label_key: data.image_key / data.label_key; None = the one Image / ClassLabel column.
        train_split: the split training reads.
        val_split: the split validation reads; None = `validation`, else `test`, else (data with a
            training split alone) `val_fraction` of its labelled rows held out, stratified, drawn with
            `seed`.
        unlabeled_split: a split of images without labels for the student (any labels in it are ignored).
    """

    def __init__(self, root: str, image_key: str | None = None, label_key: str | None = None,
                 train_split: str = "train", val_split: str | None = None, unlabeled_split: str | None = None,
                 val_fraction: float = 0.2, seed: int = 0, max_bad_fraction: float = 0.01) -> None:
        self.root, self.max_bad_fraction = str(root), max_bad_fraction
        self._labels: dict[str, np.ndarray] = {}  # split -> its label column, read once
        self.splits = open_splits(root)
        self._choose_splits(train_split, val_split, unlabeled_split)
        features = self.splits[self.train].features
        self.image_key = _pick_column(features, image_key, "Image", "data.image_key", "images")
        self.label_key = _pick_column(features, label_key, "ClassLabel", "data.label_key", "class labels")
        self._check_columns()
        self.class_names = self._class_names()
        self._check_labels()
        self.rows: dict[str, np.ndarray | None] = {"train": None, "val": None}
        if self.val is None:
            self._hold_out(val_fraction, seed)
        if self.unlabeled is None:
            extra = [s for s in self.splits if s not in (self.train, self.val, self.test) and s.startswith("unlab")]
            if extra:
                log.info("data.root: split %r is not read; data.unlabeled_split %s trains the student on it too",
                         extra[0], extra[0])

    # ----------------------------------------------------------------------------- splits and columns
    def _choose_splits(self, train: str, val: str | None, unlabeled: str | None) -> None:
        names = list(self.splits)
        listed = ", ".join(names)
        for field, name in (("data.train_split", train), ("data.val_split", val), ("data.unlabeled_split", unlabeled)):
            if name is not None and name not in self.splits:
                raise ValueError(f"{field}={name!r} is not a split of the data; its splits: {listed}")
        if val is None:
            val = next((s for s in ("validation", "test") if s in self.splits and s not in (train, unlabeled)), None)
            if val is None and set(names) - {train, unlabeled}:
                raise ValueError(f"data.source hfds: no validation or test split among {listed}; set data.val_split "
                                 f"to the split validation reads")
        chosen = [s for s in (train, val, unlabeled) if s is not None]
        if len(set(chosen)) < len(chosen):
            raise ValueError(f"data.train_split={train!r}, data.val_split={val!r} and data.unlabeled_split="
                             f"{unlabeled!r} must name different splits")
        for field, name in (("data.train_split", train), ("data.val_split", val), ("data.unlabeled_split", unlabeled)):
            if name is not None and len(self.splits[name]) == 0:
                raise ValueError(f"{field}={name!r}: the split holds no rows; fix the data or name another split "
                                 f"(splits: {listed})")
        self.train, self.val, self.unlabeled = train, val, unlabeled
        self.test = "test" if "test" in self.splits and "test" not in chosen else val

    def _check_columns(self) -> None:
        """Every split read has the image column (cast to `Image` when the named column holds paths or
        bytes) and, but for the unlabelled split, the label column."""
        hf = _datasets()
        for name in dict.fromkeys(s for s in (self.train, self.val, self.test, self.unlabeled) if s is not None):
            split = self.splits[name]
            features = split.features
            if self.image_key not in features:
                raise ValueError(f"data.image_key={self.image_key!r}: split {name!r} has no such column; its columns: "
                                 f"{_columns(features)}")
            if type(features[self.image_key]).__name__ != "Image":
                try:
                    split = split.cast_column(self.image_key, hf.Image())
                except Exception as e:  # noqa: BLE001 - not paths nor bytes
                    raise ValueError(f"data.image_key={self.image_key!r} holds {_kind(features[self.image_key])} values, "
                                     f"not images, paths or image bytes ({_first_line(e)}); set data.image_key to the "
                                     f"image column (columns: {_columns(features)})") from None
            if name != self.unlabeled and self.label_key not in features:
                raise ValueError(f"data.label_key={self.label_key!r}: split {name!r} has no such column; its columns: "
                                 f"{_columns(features)}")
            self.splits[name] = split

    def _class_names(self) -> list[str]:
        feature = self.splits[self.train].features[self.label_key]
        names = getattr(feature, "names", None)
        if names is not None and len(names) < 2:
            raise ValueError(f"data.label_key={self.label_key!r}: its ClassLabel names {len(names)} class(es); at least "
                             f"2 are needed")
        if names is not None:
            for name in (self.val, self.test):
                other = getattr(self.splits[name].features[self.label_key], "names", None) if name else None
                if other is not None and list(other) != list(names):
                    raise ValueError(f"data.label_key={self.label_key!r}: split {name!r} names its classes otherwise "
                                     f"than split {self.train!r} ({list(other)[:5]}... vs {list(names)[:5]}...); "
                                     f"give every split the same ClassLabel")
            return [str(n) for n in names]
        top = max(int(self.targets(s).max(initial=-1)) for s in (self.train, self.val, self.test) if s)
        if top < 1:
            raise ValueError(f"data.label_key={self.label_key!r}: the labels span {top + 1} class(es); at least 2 are needed")
        log.warning("data.label_key=%r is an integer column without class names (no ClassLabel feature): the classes are "
                    "named 0..%d; cast it to datasets.ClassLabel(names=[...]) to name them", self.label_key, top)
        return [str(i) for i in range(top + 1)]

    def targets(self, split: str) -> np.ndarray:
        """The label column of a split as int64, None -> -1; all -1 for a split without one (read once).
        The unlabelled split's labels, if it has any, are read here too (the fingerprint hashes them);
        `dataset("unlabeled")` serves every row with -1."""
        if split not in self._labels:
            ds = self.splits[split]
            if self.label_key not in ds.column_names:
                self._labels[split] = np.full(len(ds), UNLABELED, dtype=np.int64)
            else:
                import pyarrow as pa
                import pyarrow.compute as pc

                column = ds.select_columns([self.label_key]).with_format("arrow")[self.label_key]
                if not (pa.types.is_integer(column.type) or pa.types.is_null(column.type)):
                    raise ValueError(f"data.label_key={self.label_key!r} holds {column.type} values, not class indices; "
                                     f"set data.label_key to the label column (columns: {_columns(ds.features)})")
                self._labels[split] = np.asarray(pc.fill_null(column, UNLABELED).to_numpy(zero_copy_only=False),
                                                 dtype=np.int64).reshape(-1)
        return self._labels[split]

    def _label_bytes(self, split: str) -> bytes:
        """A split's labels for the fingerprint: whatever the options (an unlabelled split's labels too), so
        that a teacher and a student reading the same data with other options agree; a label column of
        another type in a split nobody reads, by its type."""
        try:
            return self.targets(split).tobytes()
        except ValueError:
            return str(self.splits[split].features.get(self.label_key)).encode()

    def _check_labels(self) -> None:
        n = len(self.class_names)
        for name in dict.fromkeys(s for s in (self.train, self.val, self.test) if s):
            y = self.targets(name)
            low = UNLABELED if name == self.train else 0  # held-out rows need a label
            bad = np.flatnonzero((y < low) | (y >= n))
            if len(bad):
                row, value = int(bad[0]), int(y[bad[0]])
                rule = "-1 or None marks an unlabelled training row" if name == self.train else \
                    "every validation/test row needs a label"
                raise ValueError(f"data.label_key={self.label_key!r}: {len(bad)} label(s) of split {name!r} lie outside "
                                 f"0..{n - 1} (the {n} classes), e.g. row {row}: {value if value != UNLABELED else 'none'}; "
                                 f"fix the labels ({rule})")
        if not (self.targets(self.train) >= 0).any():
            raise ValueError(f"data.train_split={self.train!r}: no row has a label; the teacher needs labelled images")

    def _hold_out(self, fraction: float, seed: int) -> None:
        """Data with a training split alone: `fraction` of its labelled rows validate (stratified by class
        where every class has two rows, drawn with `seed`); its unlabelled rows stay in training."""
        from sklearn.model_selection import train_test_split

        y = self.targets(self.train)
        labeled = np.flatnonzero(y >= 0)
        try:
            _, val = train_test_split(labeled, test_size=fraction, stratify=y[labeled], random_state=seed)
        except ValueError:  # a class with a single row: a plain random split
            _, val = train_test_split(labeled, test_size=fraction, random_state=seed)
        val = np.sort(val)
        self.rows = {"train": np.setdiff1d(np.arange(len(y)), val), "val": val}
        self.val = self.test = self.train
        log.info("data.root: no validation or test split; %d of the %d labelled rows of %r validate (data.val_fraction "
                 "%s, data.seed %d)", len(val), len(labeled), self.train, fraction, seed)

    # ------------------------------------------------------------------------------- what is served
    def split_of(self, part: Part) -> tuple[str, np.ndarray | None]:
        """The split name and rows (None = all) of a part."""
        if part == "unlabeled":
            if self.unlabeled is None:
                raise ValueError("data.unlabeled_split is not set")
            return self.unlabeled, None
        if part == "test" and self.test != self.val:
            return self.test, None
        return (self.train, self.rows["train"]) if part == "train" else (self.val, self.rows["val"])

    def dataset(self, part: Part, transform=None, mode: str = "RGB") -> "HFImageDataset":
        split, rows = self.split_of(part)
        targets = np.full(len(self.splits[split]), UNLABELED) if part == "unlabeled" else self.targets(split)
        return HFImageDataset(self.splits[split], self.image_key, targets if rows is None else targets[rows], mode,
                              transform, rows=rows, split=split, max_bad_fraction=self.max_bad_fraction)

    def labeled_rows(self) -> np.ndarray | None:
        """Which training rows have a label (in the training set's order); None when all of them do."""
        split, rows = self.split_of("train")
        y = self.targets(split) if rows is None else self.targets(split)[rows]
        return None if (y >= 0).all() else y >= 0

    @cached_property
    def mode(self) -> str:
        """L when every image of a sample of training and validation images is grayscale, else RGB (as
        `distill.data.datasets.folder_mode` decides for an image folder)."""
        from PIL import Image

        gray = colour = 0
        for part in ("train", "val"):
            ds = self.dataset(part)
            for i in _spread(len(ds), MODE_SAMPLE // 2):
                try:
                    with Image.open(io.BytesIO(ds.image_bytes(int(i)))) as im:
                        is_gray = Image.getmodebase(im.mode) == "L"
                except Exception:  # noqa: BLE001 - an undecodable image is counted when it is read
                    continue
                gray, colour = gray + is_gray, colour + (not is_gray)
        if gray and colour:
            log.info("data.root: %d grayscale and %d colour images checked: reading all as RGB (set data.in_chans to "
                     "force)", gray, colour)
        return "L" if gray and not colour else "RGB"

    def fingerprint(self) -> dict[str, Any]:
        """What `ImageDataModule.split_fingerprint` is made of: `dataset` (a sha256 of the chosen columns,
        the class names, every split's name, size and label column, and the stored bytes of 64 images
        spread over each split) and the row keys (`split:row`) of validation and training.

        Not `Dataset._fingerprint`: it names how the arrow files were produced or where they were cached
        (the same parquet files loaded from another folder get another one, and so does the same data
        saved with `save_to_disk` and with `to_parquet`), so a student reading another copy of its
        teacher's data would look like it read other data and escape the leakage check. Hashing every image would read the whole set at
        every start (ImageNet: 140 GB); the labels and a spread sample of image bytes tell data sets
        apart, and within one data set a row is named by its split and position."""
        h = hashlib.sha256()

        def put(data: bytes) -> None:
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)

        put(repr(("hfds", self.image_key, self.label_key, self.class_names)).encode())
        for name in sorted(self.splits):
            n = len(self.splits[name])
            put(f"{name}:{n}".encode())
            put(self._label_bytes(name))
            if self.image_key in self.splits[name].column_names:
                ds = HFImageDataset(self.splits[name], self.image_key, np.zeros(n, np.int64), "RGB", split=name)
                for i in _spread(n, FINGERPRINT_SAMPLE):
                    put(ds.image_bytes(int(i)))
        keys = {}
        for part in ("train", "val"):  # split:row
            split, rows = self.split_of(part)
            keys[part] = [f"{split}:{r}" for r in (range(len(self.splits[split])) if rows is None else rows.tolist())]
        return dict(dataset=h.hexdigest(), val=keys["val"], train=keys["train"])


# ---------------------------------------------------------------------------------------- dataset
class HFImageDataset(Dataset):
    """One split (or some rows of it) of a `datasets.Dataset`: `(image, label)` items, the image decoded
    from its stored bytes when read and converted to `mode` (L or RGB), then `transform`.

    `targets` holds every label (-1 = unlabelled). Only the image column is read per item, with
    decoding off, so `image_bytes(i)` gives the stored (encoded) bytes too. An image that cannot be
    decoded is replaced by the next one with a counted warning, up to `max_bad_fraction` of the rows
    (as an image folder's unreadable files are)."""

    def __init__(self, table: Any, image_key: str, targets: Sequence[int], mode: str, transform=None,
                 rows: np.ndarray | None = None, split: str = "train", max_bad_fraction: float = 0.01) -> None:
        hf = _datasets()
        self.table = table.select_columns([image_key]).cast_column(image_key, hf.Image(decode=False))
        self.image_key, self.mode, self.transform, self.split = image_key, mode, transform, split
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self.targets = [int(t) for t in targets]
        self.max_bad_fraction = max_bad_fraction
        self._decoder = hf.Image()
        self._bad_seen: set[int] = set()

    def __len__(self) -> int:
        return len(self.targets)

    def row(self, i: int) -> int:
        """The row of the split that item `i` is."""
        return int(self.rows[i]) if self.rows is not None else int(i)

    def describe(self, i: int) -> str:
        return f"row {self.row(i)} of split {self.split!r}"

    def _stored(self, i: int) -> dict[str, Any]:
        return self.table[self.row(i)][self.image_key]

    def image_bytes(self, i: int) -> bytes:
        """The stored (encoded) bytes of image `i`, or its file's bytes when the data stores a path."""
        value = self._stored(i) or {}
        if value.get("bytes") is not None:
            return value["bytes"]
        if value.get("path"):
            return Path(value["path"]).read_bytes()
        return b""

    def byte_digests(self) -> list[str]:
        """sha256 of every image's stored bytes (no decoding), in order: duplicate checks."""
        return [hashlib.sha256(self.image_bytes(i)).hexdigest() for i in range(len(self))]

    def __getitem__(self, i: int):
        n = len(self)
        for j in range(i, i + n):
            try:
                img = self._decoder.decode_example(self._stored(j % n)).convert(self.mode)
                i = j % n  # the image served, and its label
                break
            except Exception as e:  # noqa: BLE001 - any decode failure makes the image unusable
                self._bad_seen.add(j % n)
                if len(self._bad_seen) > self.max_bad_fraction * n:
                    raise ValueError(f"data.root: {len(self._bad_seen)} of {n} images of split {self.split!r} cannot "
                                     f"be decoded (e.g. {self.describe(j % n)}: {_first_line(e)}), above "
                                     f"data.max_bad_fraction={self.max_bad_fraction}; fix or remove them") from None
                log.warning("skipping undecodable image (%s; %d so far in this process)", self.describe(j % n),
                            len(self._bad_seen))
        return (self.transform(img) if self.transform else img), self.targets[i]


# ------------------------------------------------------------------------------- held-out duplicates
def refuse_held_out_duplicates(train: HFImageDataset, extra: Any, held_out: Sequence[HFImageDataset]) -> None:
    """Refuses unlabelled images that are validation or test images too (the same stored bytes): the
    training rows without a label, and the rows of data.unlabeled_split (`extra`, when it is one). The
    student would learn the held-out images through its teacher and every score would be inflated."""
    parts = [(train, [i for i, t in enumerate(train.targets) if t < 0], "training rows without a label")]
    if isinstance(extra, HFImageDataset):
        parts.append((extra, range(len(extra)), f"rows of data.unlabeled_split {extra.split!r}"))
    if not any(len(p[1]) for p in parts):
        return
    theirs: dict[str, str] = {}
    for ds in held_out:
        for i, digest in enumerate(ds.byte_digests()):
            theirs.setdefault(digest, ds.describe(i))
    for ds, items, what in parts:
        found = [(ds.describe(i), theirs[d]) for i in items
                 if (d := hashlib.sha256(ds.image_bytes(i)).hexdigest()) in theirs]
        if found:
            raise ValueError(f"data.root: {len(found)} of {len(items):,} {what} are validation/test images too (e.g. "
                             f"{found[0][0]} is {found[0][1]}); remove them from the data: the student would learn "
                             f"the held-out images through its teacher and every score would be inflated")
