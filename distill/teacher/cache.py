"""Teacher-output cache: run the frozen teacher once, reuse its outputs in every later step.

The teacher's forward pass is the largest single cost of a DeiT distillation step (RegNetY-16GF on
224px images costs more than the DeiT-S student's forward + backward). Its outputs depend only on
the image it sees, so they can be computed once and read back - as long as the image it sees is
exactly the image the student sees. For a fixed transform that is the sample index; for random
augmentation it is the *view*: every sample's augmentation is drawn from an RNG seeded by
`(seed, view, index)` (`KeyedViews`, or the on-device loader), so that view `v` of sample `i` is
bit-identical whenever it is replayed (the idea of FKD, Shen & Xing 2022). Epoch `e` trains on view
`e % view_epochs` (`data.view_epochs`), or on view `e` (a new view every epoch).

The cache grows: a view is built (the teacher run over every sample once) when a run first needs it,
at the start of the epoch that reads it, and kept. Every later epoch and every later run with the same
teacher, data and transforms reads it instead: a study whose variants all read one cache runs the
teacher once per view, whatever the number of variants, seeds and epochs, and a longer run only adds
the views past the shorter ones'.

Storage (one directory):
    manifest.json                              what the cache is built from: teacher weights sha256 and
                                               input (mean/std/size), data fingerprint, transform repr,
                                               seed, top-k, dtype, build precision
    view-VVVVV/shard-RRRR-of-WWWW.values.npy   (rows, k or C) logits of view V, float16 or float32
    view-VVVVV/shard-RRRR-of-WWWW.indices.npy  (rows, k) int16/int32 class ids (top-k only)
    view-VVVVV/shard-RRRR-of-WWWW.lse.npy      (rows,) float32 logsumexp of the full logits (top-k only)
    view-VVVVV/shard-RRRR-of-WWWW.done.json    written last: the shard of that view is complete
Sample `i` lives in shard `i % W`, row `i // W`: process `r` of `W` builds shard `r` alone (one process at
a time per shard and view, under a file lock: runs that need a view together build it once), and every
process can read every shard through a read-only memory map.

Top-k reconstruction: the stored top-k logits are put back in place and every other class gets
the same logit, chosen so that the softmax at temperature 1 gives the k stored classes exactly their
true probabilities and spreads the remaining mass `1 - sum(top-k)` (known from the stored logsumexp)
evenly over the other C - k classes. Hard distillation (argmax) is exact for any k >= 1. Every other
loss reads the whole distribution, and a uniform tail is not it: at tau 3 with 1,000 classes and
k = 10 the rebuilt KL was 0.77 instead of 1.85. So `topk: auto` (the default) stores all logits for
those losses and the top 10 for hard distillation, and a top-k cache is refused for them.

Before the cache is used, `TeacherCache.check_compatible` refuses it with a one-line ValueError when
the teacher, the data, the transforms or the precision of the teacher's pass differ from the
manifest, and the first `verify_batches` training batches are compared with the live teacher
(tolerance from the storage dtype and the precision of both passes).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import numpy as np
import torch
from torch import nn

FORMAT_VERSION = 2  # 1: every view built up front in one file per shard
MANIFEST = "manifest.json"


@dataclass
class TeacherCacheConfig:
    """Opt-in teacher-output cache (`model.teacher_cache`); needs `data.keyed_views: true`.

    Args:
        dir: cache directory; created at the start of training when it holds no cache, each view built
            when an epoch first reads it. `{teacher_dir}`
            stands for the teacher's run folder (the parent of its checkpoints/ folder; the first
            teacher's for an ensemble), so a recipe can keep each teacher's cache next to it, e.g.
            `{teacher_dir}/cache`. For a `local-dir:PATH` teacher it is PATH, for `hf-hub:ORG/NAME[@REV]`
            the folder `hf-hub/ORG/NAME[@REV]` in the working directory.
        topk: classes stored per view (the largest logits plus the logsumexp), exact for hard
            distillation only; None = all logits (what soft, DKD and DIST need); `auto` = 10 for hard
            distillation, all logits otherwise.
        dtype: storage dtype of the logits: float16 (half the disk, ~1e-3 relative error) or float32.
        build: build the cache (and the views training reads) when `dir` lacks them; false = fail instead.
        verify_batches: the first N training batches are also run through the live teacher and
            compared with the cache; a mismatch stops training. 0 = off.
        batch_size: batch size of the build pass; None = the data's.
        build_ahead: build the next epoch's view on a background thread while this epoch trains
            (`distill.teacher.cache_views`): the same views and the same training, without stopping it for
            the teacher's pass over every sample. `auto` (the default): on when the teacher runs on the CPU
            and torch leaves a core of this process idle (`OMP_NUM_THREADS=1` on a machine with more cores),
            off on an accelerator.
    """

    dir: str
    topk: int | Literal["auto"] | None = "auto"
    dtype: Literal["float16", "float32"] = "float16"
    build: bool = True
    verify_batches: int = 2
    batch_size: int | None = None
    build_ahead: bool | Literal["auto"] = "auto"


def resolve_topk(cfg: TeacherCacheConfig, argmax_only: bool, num_classes: int) -> TeacherCacheConfig:
    """`cfg` with `topk` decided for the loss: `auto` -> 10 when the loss reads only the teacher's
    argmax (hard distillation), else all logits; an explicit top-k below the class count is refused for
    a loss that reads the whole distribution."""
    from dataclasses import replace

    if cfg.topk == "auto":
        cfg = replace(cfg, topk=10 if argmax_only else None)
    if cfg.topk is not None and int(cfg.topk) >= num_classes:
        return replace(cfg, topk=None)  # every logit either way: one storage layout, one manifest
    if cfg.topk is not None and not argmax_only:
        raise ValueError(f"model.teacher_cache.topk={cfg.topk} keeps {cfg.topk} of the teacher's {num_classes} logits, "
                         f"which is exact for hard distillation only; this loss reads the whole distribution: set "
                         f"model.teacher_cache.topk to null or auto")
    return cfg


def as_config(value: "TeacherCacheConfig | dict | str | None") -> TeacherCacheConfig | None:
    if value is None or isinstance(value, TeacherCacheConfig):
        return value
    if isinstance(value, (str, Path)):
        return TeacherCacheConfig(dir=str(value))
    if isinstance(value, dict):
        return TeacherCacheConfig(**value)
    raise TypeError(f"model.teacher_cache: expected a directory or a TeacherCacheConfig, got {type(value).__name__}")


# ------------------------------------------------------------------------------------- fingerprints
def weights_sha256(model: nn.Module) -> str:
    """sha256 of every parameter and buffer (names, dtypes, shapes, bytes): the teacher's identity,
    whether it came from a file or from memory. Call it before casting the teacher to another dtype."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def transform_repr(transform: Any) -> str:
    """repr of a transform without the memory addresses some objects print."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(transform))


def dataset_fingerprint(dataset: Any, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Size, classes and a hash of all labels plus a sample of file names or image bytes (arrays, or the
    encoded images of Hugging Face datasets)."""
    n = len(dataset)
    h = hashlib.sha256()
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        h.update(np.asarray(targets, dtype=np.int64).tobytes())
    picks = np.unique(np.linspace(0, n - 1, num=min(n, 64)).astype(np.int64)) if n else []
    samples = getattr(dataset, "samples", None)
    if samples is not None:  # image folders: relative file names (an unlabelled folder's relative to it)
        roots = [str(r) for r in (getattr(dataset, "unlabeled_root", None), getattr(dataset, "root", "")) if r]
        for i in picks:
            name = str(samples[int(i)][0])
            for root in roots:
                name = name.replace(root, "")
            h.update(name.encode())
    elif callable(getattr(dataset, "image_bytes", None)):  # Hugging Face datasets: the stored (encoded) images
        for i in picks:
            h.update(dataset.image_bytes(int(i)))
    else:  # arrays (digits, CIFAR's .data, synthetic .x, device uint8 tensors)
        data = next((getattr(dataset, a) for a in ("images", "data", "x") if getattr(dataset, a, None) is not None), None)
        if data is not None:
            for i in picks:
                item = data[int(i)]
                item = item.detach().cpu().numpy() if torch.is_tensor(item) else np.asarray(item)
                h.update(np.ascontiguousarray(item).tobytes())
    return dict(num_samples=n, class_names=list(class_names) if class_names is not None else None, sha256=h.hexdigest())


# ------------------------------------------------------------------------------------------- storage
def _shard_name(rank: int, world: int) -> str:
    return f"shard-{rank:04d}-of-{world:04d}"


def _rows(num_samples: int, rank: int, world: int) -> int:
    return len(range(rank, num_samples, world))


def view_dir(directory: str | Path, view: int) -> Path:
    return Path(directory) / f"view-{int(view):05d}"


def view_done(directory: str | Path, view: int, rank: int, world: int) -> bool:
    return (view_dir(directory, view) / f"{_shard_name(rank, world)}.done.json").is_file()


def reconstruct_logits(indices: torch.Tensor, values: torch.Tensor, lse: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Full float32 logits from top-k (indices, values) and the logsumexp of the true logits: the
    k classes keep their logits, the others share the remaining probability mass evenly."""
    values = values.float()
    k = values.shape[-1]
    if k >= num_classes:
        return torch.zeros(values.shape[0], num_classes, device=values.device).scatter_(1, indices.long(), values)
    lse = lse.float()
    covered = torch.logsumexp(values, dim=-1)
    # log of the mass outside the top k, floored so that exp() stays finite in the KL (0 * log 0).
    rest = torch.log(-torch.expm1((covered - lse).clamp(max=-1e-7))).clamp(min=-60.0)
    fill = lse + rest - math.log(num_classes - k)
    out = fill[:, None].expand(-1, num_classes).clone()
    return out.scatter_(1, indices.long(), values)


class TeacherCache:
    """Read side of a cache: memory-maps the shards of each view when first read; `lookup(keys)` returns
    the stored rows of a batch of `(index, view)` keys, `logits(keys, device)` the reconstructed logits
    on `device`. `has_view(v)` tells whether every shard of view `v` is built."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        path = self.dir / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"teacher cache {str(self.dir)!r} has no {MANIFEST}; build it first")
        self.manifest: dict[str, Any] = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT_VERSION:
            raise ValueError(f"teacher cache {str(self.dir)!r} has format {self.manifest.get('format')}, "
                             f"this version reads {FORMAT_VERSION}; delete it to rebuild")
        m = self.manifest
        self.num_samples, self.world = int(m["num_samples"]), int(m["world_size"])
        self.num_classes, self.topk = int(m["num_classes"]), m["topk"]
        self._views: dict[int, list[dict[str, np.ndarray]]] = {}
        self._pin = torch.cuda.is_available()

    def has_view(self, view: int) -> bool:
        return int(view) in self._views or all(view_done(self.dir, view, r, self.world) for r in range(self.world))

    def built_views(self) -> list[int]:
        found = sorted(int(d.name.split("-")[1]) for d in self.dir.glob("view-*") if d.is_dir())
        return [v for v in found if self.has_view(v)]

    def _shards(self, view: int) -> list[dict[str, np.ndarray]]:
        """The memory-mapped shards of `view` (opened once)."""
        view = int(view)
        if view not in self._views:
            if not self.has_view(view):
                built = self.built_views()
                raise ValueError(f"teacher cache {str(self.dir)!r} holds no view {view} yet (built: "
                                 f"{_ranges(built) or 'none'}): views are built when an epoch first reads them; "
                                 f"train with this cache attached (model.teacher_cache) or set data.view_epochs")
            folder, shards = view_dir(self.dir, view), []
            for r in range(self.world):
                name = _shard_name(r, self.world)
                shard = {"values": np.load(folder / f"{name}.values.npy", mmap_mode="r")}
                if self.topk:
                    shard["indices"] = np.load(folder / f"{name}.indices.npy", mmap_mode="r")
                    shard["lse"] = np.load(folder / f"{name}.lse.npy", mmap_mode="r")
                shards.append(shard)
            self._views[view] = shards
        return self._views[view]

    # ------------------------------------------------------------------ validation
    def check_compatible(self, expected: dict[str, Any]) -> None:
        """Refuses (ValueError, one line) a cache built for another teacher, data or transform, one whose
        logits were computed in another precision (a 16-bit pass differs from a 32-bit one by more than
        the storage's rounding: near-ties flip), or one that stores less of the teacher's output than the
        loss reads. `expected` holds the manifest fields of the live set-up that are known (absent ones
        are skipped).

        `topk` is what the loss needs: None (every logit: soft, DKD, DIST, standardised KL) is served
        only by a cache of every logit, since top-k logits rebuilt with a uniform tail are another
        distribution; a number (hard distillation reads the argmax) is served by any cache."""
        m = self.manifest
        if "topk" in expected and expected["topk"] is None and m.get("topk") and int(m["topk"]) < int(m["num_classes"]):
            raise ValueError(
                f"teacher cache {str(self.dir)!r} holds only the top {m['topk']} of {m.get('num_classes')} logits (built "
                f"for hard distillation), and this loss reads the whole distribution; point model.teacher_cache.dir "
                f"elsewhere (e.g. {{teacher_dir}}/cache-full) or delete the directory to rebuild it with every logit")
        want, have = expected.get("precision"), m.get("precision") or "an unrecorded precision"
        if want is not None and m.get("precision") != want:
            raise ValueError(
                f"teacher cache {str(self.dir)!r} holds logits computed in {have} and this run computes them in "
                f"{want}; point model.teacher_cache.dir elsewhere (e.g. {{teacher_dir}}/cache-{_slug(want)}) or "
                f"delete the directory to rebuild it, or run with the cache's precision (trainer.precision, "
                f"model.teacher_dtype)")
        groups = [
            ("teacher", ("teacher",)),
            ("data", ("data",)),
            ("transforms", ("transform", "seed")),
            ("storage", ("dtype",)),
        ]
        for what, keys in groups:
            for key in keys:
                if key not in expected or expected[key] is None:
                    continue
                want, have = expected[key], m.get(key)
                if isinstance(want, dict):
                    diff = [k for k in want if want[k] is not None and have is not None and have.get(k) != want[k]]
                    if have is None or diff:
                        raise ValueError(
                            f"teacher cache {str(self.dir)!r} is stale: its {what} differs ({key}: "
                            f"{', '.join(diff) or 'missing'}); delete the directory to rebuild or point "
                            f"model.teacher_cache.dir elsewhere")
                elif have != want:
                    raise ValueError(
                        f"teacher cache {str(self.dir)!r} is stale: its {what} differs ({key} is "
                        f"{_short(have)}, the run has {_short(want)}); delete the directory to rebuild or "
                        f"point model.teacher_cache.dir elsewhere")

    # ---------------------------------------------------------------------- reading
    def lookup(self, keys: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """Stored rows for keys `(B, 2)` = (sample index, view), as CPU tensors (pinned when CUDA is
        available, so the copy to the GPU is asynchronous)."""
        keys = keys.cpu().numpy() if torch.is_tensor(keys) else np.asarray(keys)
        keys = keys.reshape(-1, 2).astype(np.int64, copy=False)
        idx, view = keys[:, 0], keys[:, 1]
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_samples):
            raise ValueError(f"teacher cache {str(self.dir)!r} holds {self.num_samples} samples; the batch asks for "
                             f"sample {int(idx.max())}: the data differs from the cache's")
        if view.size and view.min() < 0:
            raise ValueError(f"teacher cache {str(self.dir)!r}: the batch asks for view {int(view.min())}; views are >= 0")
        shard, row = idx % self.world, idx // self.world
        views = np.unique(view)
        if len(views) == 1 and self.world == 1:  # one epoch's batch on one process: plain gathers
            out = {name: np.asarray(arr[row]) for name, arr in self._shards(int(views[0]))[0].items()}
        else:
            first = self._shards(int(views[0]))[0]
            out = {name: np.empty((len(idx),) + arr.shape[1:], dtype=arr.dtype) for name, arr in first.items()}
            for v in views:
                shards = self._shards(int(v))
                for s in np.unique(shard[view == v]):
                    sel = (view == v) & (shard == s)
                    for name in out:
                        out[name][sel] = shards[int(s)][name][row[sel]]
        tensors = {k: torch.from_numpy(v.astype(np.int64) if k == "indices" else v) for k, v in out.items()}
        if self._pin:
            tensors = {k: v.pin_memory() for k, v in tensors.items()}
        return tensors

    def logits(self, keys: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """Float32 teacher logits `(B, C)` for the keys, on `device` (top-k reconstructed)."""
        rows = {k: v.to(device, non_blocking=True) for k, v in self.lookup(keys).items()}
        if not self.topk:
            return rows["values"].float()
        return reconstruct_logits(rows["indices"], rows["values"], rows["lse"], self.num_classes)

    def verify(self, cached: torch.Tensor, live: torch.Tensor, live_precision: str | None = None) -> None:
        """Raises ValueError when cached logits disagree with the live teacher's on the same views
        beyond what storage dtype and compute precision explain (compared on the stored classes)."""
        live = live.float()
        if self.topk:
            idx = cached.topk(min(self.topk, self.num_classes), dim=-1).indices
            c, l = cached.gather(1, idx), live.gather(1, idx)
        else:
            c, l = cached, live
        reduced = any(p and ("16" in str(p)) for p in (self.manifest.get("precision"), live_precision))
        scale = live.std().clamp_min(1e-3).item()
        rtol = {"float16": 2e-3, "float32": 1e-5}.get(self.manifest.get("dtype"), 2e-3)
        atol = (5e-2 if reduced else 1e-3) * scale
        if reduced:
            rtol = max(rtol, 2e-2)
        bad = ((c - l).abs() > atol + rtol * l.abs()).float().mean().item()
        # the argmax must agree wherever the live teacher is decisive; near-ties may flip with rounding
        top2 = live.topk(min(2, live.shape[-1]), dim=-1).values
        tie = (top2[:, 0] - top2[:, -1]) <= 2 * (atol + rtol * top2[:, 0].abs())
        top1 = ((cached.argmax(-1) == live.argmax(-1)) | tie).float().mean().item()
        if bad > 0.01 or top1 < (0.95 if reduced else 0.99):
            worst = (c - l).abs().max().item()
            raise ValueError(
                f"teacher cache {str(self.dir)!r} disagrees with the live teacher on this run's images "
                f"({bad:.1%} of stored logits off by more than {atol:.3g} + {rtol:g}*|z|, max {worst:.3g}, "
                f"top-1 agreement {top1:.1%}): the teacher, data or transforms changed; delete it to rebuild")


def _ranges(values: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(out)


def _slug(text: str) -> str:
    """A folder-name version of a precision (`32-true, teacher bfloat16` -> `32-true-teacher-bfloat16`)."""
    return re.sub(r"[^A-Za-z0-9.-]+", "-", text).strip("-")


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


# -------------------------------------------------------------------------------------------- building
def build_cache(
    directory: str | Path,
    teacher_fn: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple],
    *,
    num_samples: int,
    num_classes: int,
    views: int | Sequence[int] = 1,
    topk: int | None = 10,
    dtype: str = "float16",
    rank: int = 0,
    world_size: int = 1,
    manifest: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
    autocast: Callable[[], Any] | None = None,
) -> None:
    """Runs `teacher_fn` over `batches` of `(x, y, keys)` and writes shard `rank` of `world_size` of each
    view in `views` (a count: views 0 .. views-1; or the view ids).

    `batches` must cover every (sample i with i % world_size == rank, view in views) exactly as
    training will see it (same transform, same keyed seeding); rows of other ranks and views are
    skipped. With `manifest`, a single process (world_size 1) also writes `manifest.json` (with several,
    call `write_manifest` once, from rank 0, after a barrier).
    """
    directory = Path(directory)
    views = list(range(views)) if isinstance(views, int) else sorted({int(v) for v in views})
    np_dtype = {"float16": np.float16, "float32": np.float32}[dtype]
    k = min(int(topk), num_classes) if topk else None
    idx_dtype = np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32
    rows = _rows(num_samples, rank, world_size)
    name = _shard_name(rank, world_size)
    open_mm = np.lib.format.open_memmap
    out: dict[int, dict[str, np.ndarray]] = {}
    for v in views:
        folder = view_dir(directory, v)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.done.json").unlink(missing_ok=True)
        out[v] = {"values": open_mm(folder / f"{name}.values.npy", mode="w+", dtype=np_dtype, shape=(rows, k or num_classes))}
        if k:
            out[v]["indices"] = open_mm(folder / f"{name}.indices.npy", mode="w+", dtype=idx_dtype, shape=(rows, k))
            out[v]["lse"] = open_mm(folder / f"{name}.lse.npy", mode="w+", dtype=np.float32, shape=(rows,))
    written = {v: np.zeros(rows, dtype=bool) for v in views}
    wanted = np.asarray(views, dtype=np.int64)
    ctx = autocast or (lambda: torch.autocast(torch.device(device).type, enabled=False))
    with torch.no_grad():
        for batch in batches:
            x, keys = batch[0], batch[2]
            keys = keys.cpu().numpy() if torch.is_tensor(keys) else np.asarray(keys)
            mine = (keys[:, 0] % world_size == rank) & np.isin(keys[:, 1], wanted)
            if not mine.any():
                continue
            with ctx():
                z = teacher_fn(x.to(device, non_blocking=True)).float()
            z = z[torch.from_numpy(mine).to(z.device)]
            i, view = keys[mine, 0] // world_size, keys[mine, 1]
            top = z.topk(k, dim=-1) if k else None
            lse = torch.logsumexp(z, dim=-1).cpu().numpy() if k else None
            for v in np.unique(view):
                sel = view == v
                target, rows_v = out[int(v)], i[sel]
                if k:
                    target["indices"][rows_v] = top.indices[torch.from_numpy(sel).to(z.device)].cpu().numpy().astype(idx_dtype)
                    target["values"][rows_v] = top.values[torch.from_numpy(sel).to(z.device)].cpu().numpy().astype(np_dtype)
                    target["lse"][rows_v] = lse[sel]
                else:
                    target["values"][rows_v] = z[torch.from_numpy(sel).to(z.device)].cpu().numpy().astype(np_dtype)
                written[int(v)][rows_v] = True
    missing = sum(int((~w).sum()) for w in written.values())
    if missing:
        raise ValueError(f"teacher cache build: {missing} of {rows * len(views)} (view, sample) rows of shard {name} "
                         f"were not produced by the batches; the data covers fewer samples or views than declared")
    for v in views:
        for array in out[v].values():
            array.flush()
        (view_dir(directory, v) / f"{name}.done.json").write_text(json.dumps(dict(rows=rows, view=v)))
    if manifest is not None and rank == 0 and world_size == 1:
        write_manifest(directory, manifest, num_samples=num_samples, num_classes=num_classes, topk=k, dtype=dtype,
                       world_size=world_size)


def write_manifest(directory: str | Path, fields: dict[str, Any], *, num_samples: int, num_classes: int,
                   topk: int | None, dtype: str, world_size: int) -> None:
    m = dict(fields)
    m.update(format=FORMAT_VERSION, num_samples=int(num_samples), num_classes=int(num_classes),
             topk=topk, dtype=dtype, world_size=int(world_size), created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    Path(directory).mkdir(parents=True, exist_ok=True)
    tmp = Path(directory) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(m, indent=1))
    tmp.replace(Path(directory) / MANIFEST)


# Seconds a process waits for another one's build of the same shard before it gives up with an error;
# unset (the default): as long as that build takes. Tests bound it, so a wait that can never end (two
# ranks of one job on one lock) fails in seconds instead of hanging until a distant time-out.
LOCK_TIMEOUT_ENV = "DISTILL_CACHE_LOCK_TIMEOUT"


@contextmanager
def _build_lock(directory: Path, rank: int):
    """An exclusive lock on building shard `rank` of `directory` (the cache, or one view's folder), across
    processes (flock): a second process that wants the same shard waits until the first has written it (at
    most $DISTILL_CACHE_LOCK_TIMEOUT seconds when set). The holder's pid is in the lock file, for the
    message of a waiter that gives up."""
    import fcntl
    import os

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f".build-{rank:04d}.lock"
    timeout = float(os.environ.get(LOCK_TIMEOUT_ENV) or 0) or None
    with open(path, "a+") as lock:  # not "w": a waiter must not empty the holder's record
        start = time.monotonic()
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | (fcntl.LOCK_NB if timeout else 0))
                break
            except BlockingIOError:
                if time.monotonic() - start > timeout:
                    lock.seek(0)
                    holder = lock.read().strip() or "?"
                    raise TimeoutError(
                        f"teacher cache {str(directory)!r}: waited {timeout:g} s ({LOCK_TIMEOUT_ENV}) for process "
                        f"{holder} to finish building shard {rank}; wait for that run, or point "
                        f"model.teacher_cache.dir elsewhere") from None
                time.sleep(0.2)
        try:
            lock.truncate(0)
            lock.write(str(os.getpid()))
            lock.flush()
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def has_cache(directory: str | Path) -> bool:
    return (Path(directory) / MANIFEST).is_file()


# ------------------------------------------------------------------------------ FrozenTeacher glue
def teacher_fields(identity: dict[str, Any], teacher_input: nn.Module) -> dict[str, Any]:
    """The manifest's `teacher` entry: weights sha256, architecture, classes and the input it expects
    (`TeacherInput`'s mean/std, size and resizing; the data's own normalisation is part of the transform)."""
    def values(name: str):
        t = getattr(teacher_input, name, None)
        return [round(float(v), 6) for v in t.flatten()] if torch.is_tensor(t) else None

    return dict(weights_sha256=identity.get("weights_sha256"), architecture=identity.get("architecture"),
                num_classes=identity.get("num_classes"),
                input=dict(mean=values("dst_mean"), std=values("dst_std"), size=getattr(teacher_input, "dst_size", None),
                           resize=teacher_input.describe() if hasattr(teacher_input, "describe") else None))


def compute_precision(teacher, trainer=None) -> str | None:
    """The precision the teacher's logits are computed in: the trainer's, and the teacher's own dtype
    when it is kept in another one (`teacher_dtype`, e.g. "32-true, teacher bfloat16"); verification
    allows for the rounding of a 16-bit pass."""
    if trainer is None:
        return None
    first = teacher.members[0] if hasattr(teacher, "members") else teacher
    return precision_name(trainer.precision, getattr(first, "_cast", None))


def precision_name(trainer_precision: str, cast: torch.dtype | None) -> str:
    """How the manifest names a precision: the trainer's (`32-true`, `bf16-mixed`), plus the teacher's
    dtype when it is kept in another one (`32-true, teacher bfloat16`)."""
    return f"{trainer_precision}, teacher {str(cast).replace('torch.', '')}" if cast is not None else str(trainer_precision)


def cache_manifest(teacher, cfg: TeacherCacheConfig, trainer=None, dm=None) -> dict[str, Any]:
    """The manifest fields that identify the live set-up: the teacher (`FrozenTeacher`, or an ensemble
    with `members`: every member's fingerprint), the precision, storage and, with a datamodule, the data
    and the transform that draws the views."""
    members = getattr(teacher, "members", None)
    if members is not None:
        described = [teacher_fields(m.identity, m.input) for m in members]
        teacher_entry: Any = dict(members=described, combine=teacher.combine)
    else:
        teacher_entry = teacher_fields(teacher.identity, teacher.input)
    num_classes = teacher.identity.get("num_classes")
    fields: dict[str, Any] = dict(teacher=teacher_entry, precision=compute_precision(teacher, trainer))
    fields.update(topk=min(int(cfg.topk), num_classes or cfg.topk) if cfg.topk else None, dtype=cfg.dtype)
    if dm is not None:
        source = _view_source(dm)
        fields.update(data=dataset_fingerprint(source["dataset"], list(dm.class_names)),
                      transform=source["transform"], seed=int(dm.hparams.seed))
    return fields


def _view_source(dm) -> dict[str, Any]:
    """The training set (for the fingerprint), what draws its views (for the manifest) and, with
    `on_device`, the device loader that draws them."""
    if dm.hparams.get("on_device"):
        loader = getattr(dm, "_device_train", None)
        if loader is None:
            from ..data.device_loader import device_loader

            loader = device_loader(dm, "train")
        return dict(dataset=dm.train_set, transform=loader.describe(), loader=loader)
    ds = dm.train_set
    return dict(dataset=ds, transform=transform_repr(getattr(ds, "transform", None)), loader=None)


def cache_dir(cfg: TeacherCacheConfig, teacher) -> Path:
    """`cfg.dir` with `{teacher_dir}` replaced by the teacher's own folder (`teacher_folder`)."""
    if "{teacher_dir}" not in cfg.dir:
        return Path(cfg.dir).expanduser()
    first = teacher.members[0] if hasattr(teacher, "members") else teacher
    path = first.identity.get("path")
    if not path:
        raise ValueError(f"model.teacher_cache.dir={cfg.dir!r} refers to the teacher's run folder, but the teacher "
                         f"was given as a network, not a file; give the cache an explicit directory")
    return Path(cfg.dir.replace("{teacher_dir}", str(teacher_folder(path)))).expanduser()


def teacher_folder(path: str) -> Path:
    """A folder that belongs to one teacher: a checkpoint's run folder (the parent of checkpoints/), the
    folder of `local-dir:PATH` itself, and for `hf-hub:ORG/NAME[@REV]` the folder `hf-hub/ORG/NAME[@REV]`
    in the working directory: named after the whole repository id (and revision), so two teachers of one
    owner never share it, and outside the Hugging Face cache, whose snapshot folders the Hub's tools own
    (and which may be read-only or shared between users)."""
    from ..models.sources import is_source

    if is_source(path):
        from timm.models import parse_model_name

        kind, ident = parse_model_name(path.strip())
        if kind == "local-dir":
            return Path(ident).expanduser().resolve()
        repo, _, revision = ident.partition("@")
        name = repo.strip("/") + (f"@{revision.replace('/', '--')}" if revision else "")
        return Path("hf-hub", *name.split("/")).resolve()
    ckpt = Path(path)
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def open_cache(teacher, cfg: TeacherCacheConfig, trainer, device: torch.device | str = "cpu") -> TeacherCache:
    """Opens the cache of a frozen teacher at fit start (creating its manifest when the directory holds
    none and building is allowed) and checks it against the live teacher, data and transforms. Views
    are built later, when an epoch first reads them (`CachedTeacher.prepare_epoch`)."""
    dm = getattr(trainer, "datamodule", None)
    directory = cache_dir(cfg, teacher)
    expected = cache_manifest(teacher, cfg, trainer, dm)
    num_classes = teacher.identity["num_classes"]
    if dm is None:  # Python API with hand-made (x, y, keys) batches: only the teacher can be checked here
        if not has_cache(directory):
            raise ValueError("model.teacher_cache: building a cache needs an ImageDataModule with keyed_views: true")
        cache = TeacherCache(directory)
        cache.check_compatible({k: expected.get(k) for k in ("teacher", "precision", "topk", "dtype")})
        return cache
    if getattr(dm, "mixup_fn", None) is not None:
        raise ValueError("model.teacher_cache cannot be used with data.mixup/cutmix: the teacher's output on a mixed "
                         "batch is not the mix of its outputs; set data.mixup and data.cutmix to 0 or drop the cache")
    if not dm.hparams.get("keyed_views"):
        raise ValueError("model.teacher_cache needs data.keyed_views: true (batches that name the view they hold)")
    if not has_cache(directory):
        if not cfg.build:
            raise FileNotFoundError(f"model.teacher_cache: {str(directory)!r} holds no cache and build is false")
        # Several runs sharing one cache (e.g. the workers of a study) start together: one writes the manifest.
        with _build_lock(directory, 0):
            if trainer.global_rank == 0 and not has_cache(directory):
                write_manifest(directory, expected, num_samples=expected["data"]["num_samples"], num_classes=num_classes,
                               topk=expected["topk"], dtype=cfg.dtype, world_size=trainer.world_size)
    # Every process meets here, whether it found the manifest or not: a rank that looked after rank 0 had written
    # it would otherwise skip the barrier the others wait in, and the job's next collective would hang.
    trainer.strategy.barrier("teacher_cache_manifest")
    cache = TeacherCache(directory)
    cache.check_compatible({k: expected.get(k) for k in ("teacher", "data", "transform", "seed", "precision", "topk",
                                                         "dtype")})
    if cache.world != trainer.world_size:
        raise ValueError(f"teacher cache {str(directory)!r} is sharded for {cache.world} process(es) and this run has "
                         f"{trainer.world_size}; point model.teacher_cache.dir elsewhere for this world size")
    return cache


class CachedTeacher:
    """What a `FrozenTeacher` reads its training logits from once a cache is attached: the stored
    outputs of the batch's views, checked against the live teacher on the first `verify_batches`.

    `prepare_epoch(epoch, next_epoch_runs)` (DistillModule calls it when an epoch starts) builds the epoch's
    view with `build_view` when the cache lacks it, and, when another epoch follows and `build_view` can
    (`cache_views.ViewBuilder.start_ahead`), starts building the next epoch's view in the background; epoch
    `e` reads view `e % view_epochs`, or `e`."""

    def __init__(self, cache: TeacherCache, verify_batches: int, precision: str | None,
                 build_view: Callable[[int], None] | None = None, view_epochs: int | None = None) -> None:
        self.cache, self.to_verify, self.precision = cache, int(verify_batches), precision
        self.build_view, self.view_epochs = build_view, view_epochs

    def view_of(self, epoch: int) -> int:
        return epoch % self.view_epochs if self.view_epochs else epoch

    def prepare_epoch(self, epoch: int, next_epoch_runs: bool = False) -> None:
        view = self.view_of(epoch)
        if self.build_view is None:
            return
        self.build_view(view)  # every process calls it (it ends in a barrier), built or not
        start_ahead = getattr(self.build_view, "start_ahead", None)
        if next_epoch_runs and start_ahead is not None and self.view_of(epoch + 1) != view:
            start_ahead(self.view_of(epoch + 1))

    def stop(self) -> None:
        """Stops a build of a view ahead that no epoch of this fit will read (`ViewBuilder.stop_ahead`)."""
        stop_ahead = getattr(self.build_view, "stop_ahead", None)
        if stop_ahead is not None:
            stop_ahead()

    def __call__(self, teacher, batch) -> torch.Tensor:
        if len(batch) < 3:
            raise ValueError("model.teacher_cache needs batches (x, y, keys): set data.keyed_views: true")
        x = batch[0]
        z = self.cache.logits(batch[2], x.device)
        if self.to_verify > 0:
            self.to_verify -= 1
            self.cache.verify(z, teacher(x), self.precision)
        return z
