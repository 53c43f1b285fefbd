"""What a ViT student attends to: attention probabilities, rollout and patch affinity, as pure functions.

timm's `Attention` runs fused `scaled_dot_product_attention`, so the probabilities
`softmax(q k^T / sqrt(d))` never exist as a tensor. Rather than switching the model to its slow path
(which would change the model), a forward pre-hook on every `block.attn` records the block's normalised
input, and the probabilities are recomputed from the same weights: `attn.qkv`, `attn.q_norm`,
`attn.k_norm` and `attn.scale`.

Token layout of a student of this toolkit: token 0 is the class token, token 1 the distillation token
(DeiT, `num_prefix_tokens == 2`; a plain ViT has only the class token), then the patches in row-major
order on a grid of `img_size / patch_size`.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

__all__ = [
    "AttentionMaps",
    "attention_probs",
    "attention_maps",
    "rollout",
    "token_attention",
    "affinity",
    "prefix_tokens",
    "patch_grid",
]


@dataclass
class AttentionMaps:
    """Attention of a batch of images, on the CPU in float32.

    Attributes:
        layers: one `(B, heads, N, N)` tensor of attention probabilities per block; rows (queries) sum to 1.
        num_prefix_tokens: tokens before the patches (class, distillation, registers).
        tokens: `{name: index}` of the tokens that have a head: `class` and, for DeiT, `distillation`.
        grid: `(rows, cols)` of the patch grid.
        rollout: `(B, N, N)` attention rollout over all blocks (`rollout(layers)`).
    """

    layers: list[torch.Tensor]
    num_prefix_tokens: int
    tokens: dict[str, int]
    grid: tuple[int, int]
    rollout: torch.Tensor

    @property
    def num_heads(self) -> int:
        return self.layers[0].shape[1]

    def token_map(self, token: str, layer: int = -1, head: int | None = None) -> torch.Tensor:
        """`(B, rows, cols)` attention of `token` (`class` / `distillation`) to the patches in one block,
        one head or (head=None) the mean over heads. Values are probabilities: together with the
        attention the token pays to the prefix tokens they sum to 1."""
        a = token_attention(self.layers[layer], self.tokens[token], self.num_prefix_tokens)  # (B, H, P)
        a = a.mean(1) if head is None else a[:, head]
        return a.reshape(a.shape[0], *self.grid)

    def head_maps(self, token: str, layer: int = -1) -> torch.Tensor:
        """`(B, heads, rows, cols)` attention of `token` to the patches, per head."""
        a = token_attention(self.layers[layer], self.tokens[token], self.num_prefix_tokens)
        return a.reshape(*a.shape[:2], *self.grid)

    def rollout_map(self, token: str) -> torch.Tensor:
        """`(B, rows, cols)` rollout of `token` over the patches (normalised to sum to 1 over the patches)."""
        r = self.rollout[:, self.tokens[token], self.num_prefix_tokens:]
        r = r / r.sum(-1, keepdim=True).clamp_min(1e-12)
        return r.reshape(r.shape[0], *self.grid)

    def affinity(self, layer: int = -1, head: int | None = None) -> torch.Tensor:
        """`(B, N, N)` token-to-token affinity of one block (see `affinity`)."""
        return affinity(self.layers, layer, head)


# ----------------------------------------------------------------------------------------- model facts
def prefix_tokens(model: nn.Module) -> tuple[int, dict[str, int]]:
    """(number of tokens before the patches, {name: index} of the class and distillation tokens)."""
    n = int(getattr(model, "num_prefix_tokens", 1))
    tokens: dict[str, int] = {}
    if getattr(model, "cls_token", None) is not None:
        tokens["class"] = 0
    if getattr(model, "dist_token", None) is not None:
        tokens["distillation"] = 1
    return n, tokens


def patch_grid(model: nn.Module, image_hw: Sequence[int]) -> tuple[int, int]:
    """(rows, cols) of the patch grid for an input of `image_hw` pixels."""
    pe = model.patch_embed
    if hasattr(pe, "dynamic_feat_size"):  # timm's PatchEmbed: knows its stride and dynamic padding
        rows, cols = pe.dynamic_feat_size((int(image_hw[0]), int(image_hw[1])))
        return int(rows), int(cols)
    ph, pw = (pe.patch_size, pe.patch_size) if isinstance(pe.patch_size, int) else tuple(pe.patch_size)
    return int(image_hw[0]) // int(ph), int(image_hw[1]) // int(pw)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()  # no drop path / dropout: the maps must describe the deterministic network
    try:
        yield
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------------------ extraction
def _probs_from_input(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * scale) of a timm `Attention` for its input x `(B, N, C)`: `(B, heads, N, N)`."""
    B, N, _ = x.shape
    heads = attn.num_heads
    head_dim = getattr(attn, "head_dim", None) or attn.qkv.out_features // (3 * heads)
    qkv = attn.qkv(x).reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    scale = float(getattr(attn, "scale", head_dim ** -0.5))
    logits = (q.float() @ k.float().transpose(-2, -1)) * scale
    return logits.softmax(-1)


@torch.no_grad()
def attention_probs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Attention probabilities of every block of a timm ViT for the batch `x`.

    Returns one `(B, heads, N, N)` float32 CPU tensor per block. The model runs once in eval mode
    (its mode is restored afterwards) and is otherwise untouched: hooks are removed on the way out.
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None or not all(hasattr(getattr(b, "attn", None), "qkv") for b in blocks):
        raise ValueError(
            f"{type(model).__name__} is not a timm VisionTransformer with qkv attention; "
            f"attention maps need a ViT student (distill.build_student)"
        )
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        inp = args[0] if args else kwargs["x"]
        captured.append(_probs_from_input(module, inp).cpu())

    handles = [b.attn.register_forward_pre_hook(hook, with_kwargs=True) for b in blocks]
    try:
        with _eval_mode(model):
            model.forward_features(x)
    finally:
        for h in handles:
            h.remove()
    return captured


def attention_maps(model: nn.Module, x: torch.Tensor) -> AttentionMaps:
    """Everything the attention figures show, for the batch `x` (already normalised for the model)."""
    layers = attention_probs(model, x)
    n_prefix, tokens = prefix_tokens(model)
    grid = patch_grid(model, x.shape[-2:])
    n_tokens = layers[0].shape[-1]
    if grid[0] * grid[1] != n_tokens - n_prefix:
        raise ValueError(
            f"the model has {n_tokens - n_prefix} patch tokens but a {x.shape[-2]}x{x.shape[-1]} input gives a "
            f"{grid[0]}x{grid[1]} grid; feed images of the model's img_size"
        )
    return AttentionMaps(layers=layers, num_prefix_tokens=n_prefix, tokens=tokens, grid=grid, rollout=rollout(layers))


# -------------------------------------------------------------------------------------------- analysis
def rollout(layers: Sequence[torch.Tensor], residual: float = 0.5) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020) over `layers`, each `(B, heads, N, N)` or `(heads, N, N)`.

    Per block the heads are averaged and the residual connection is accounted for as
    `A' = residual * I + (1 - residual) * A`, rows renormalised to sum to 1; the rollout is the product
    `A'_L ... A'_2 A'_1` (row i: how much token i at the output draws on each input token).
    """
    if not layers:
        raise ValueError("rollout needs at least one layer")
    result = None
    for a in layers:
        a = a.float().mean(-3)  # average over heads
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = residual * eye + (1.0 - residual) * a
        a = a / a.sum(-1, keepdim=True)
        result = a if result is None else a @ result
    return result


def token_attention(layer: torch.Tensor, token: int, num_prefix_tokens: int) -> torch.Tensor:
    """`(..., heads, patches)`: the row of `token` in a `(..., heads, N, N)` attention tensor, patch columns only."""
    return layer[..., token, num_prefix_tokens:]


def affinity(layers: Sequence[torch.Tensor], layer: int = -1, head: int | None = None) -> torch.Tensor:
    """`(B, N, N)` affinity `softmax(q k^T / sqrt(d))` of block `layer` (negative counts from the end),
    one head or (head=None) the mean over heads. Row i: how query token i spreads its attention over
    all tokens (prefix tokens first, then the patches row by row)."""
    n = len(layers)
    if not -n <= layer < n:
        raise IndexError(f"layer {layer} is out of range; the model has {n} blocks (0..{n - 1}, or -1 for the last)")
    a = layers[layer]
    heads = a.shape[-3]
    if head is None:
        return a.mean(-3)
    if not -heads <= head < heads:
        raise IndexError(f"head {head} is out of range; the model has {heads} heads (0..{heads - 1})")
    return a[..., head, :, :]
