"""The paper's two mapping networks: CLIP embedding (B, clip_dim) -> prefix (B, k, lm_hidden); and both reading image
tokens (B, T, D) instead (beyond the paper): the MLP on the flattened tokens -> (B, k, lm_hidden), the Transformer
mapper -> (B, T + k, lm_hidden). `pool_tokens` pools a vision tower's patch grid into the tokens they read.

Module and parameter names follow rmokady/CLIP_prefix_caption so original weights map one-to-one
(docs/design.md §5): `model.0`/`model.2` for the MLP; `linear`, `prefix_const`, `transformer.layers.{i}.*` for the
Transformer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ClipCapError


def pool_tokens(hidden: torch.Tensor, grid: int | None) -> torch.Tensor:
    """A ViT's last hidden states (B, T, D) with the patch grid average-pooled to `grid` x `grid` cells (None, or a
    grid at least the patch grid's side: every token kept). Tokens before the patches (CLIP's class token) are
    kept as they are; the patches must form a square grid after 0 or 1 of them."""
    if grid is None:
        return hidden
    if not isinstance(grid, int) or isinstance(grid, bool) or grid < 1:
        raise ClipCapError(f"the token grid must be a positive integer, got {grid!r}")
    b, t, d = hidden.shape
    for lead in (1, 0):  # a class token is the common case; a square count alone is ambiguous only for t = 1
        side = math.isqrt(t - lead)
        if t - lead > 0 and side * side == t - lead:
            break
    else:
        raise ClipCapError(f"cannot pool {t} image tokens into a grid: they are not a square grid of patches")
    if grid >= side:
        return hidden
    patches = hidden[:, lead:].transpose(1, 2).reshape(b, d, side, side)
    pooled = F.adaptive_avg_pool2d(patches.float(), grid).to(hidden.dtype).flatten(2).transpose(1, 2)
    return torch.cat((hidden[:, :lead], pooled), dim=1)


class MLPMapper(nn.Module):
    """Linear(clip_dim, h·k/2) -> Tanh -> Linear(h·k/2, h·k), reshaped to (k, h)."""

    def __init__(self, clip_dim: int, lm_hidden: int, prefix_length: int):
        super().__init__()
        self.prefix_length = prefix_length
        self.lm_hidden = lm_hidden
        out = lm_hidden * prefix_length
        self.model = nn.Sequential(nn.Linear(clip_dim, out // 2), nn.Tanh(), nn.Linear(out // 2, out))

    def forward(self, clip_embeds: torch.Tensor) -> torch.Tensor:
        return self.model(clip_embeds).view(-1, self.prefix_length, self.lm_hidden)


class TokenMLPMapper(nn.Module):
    """The paper's MLP reading image tokens (B, T, D): LayerNorm per token, flattened to T·D, then MLPMapper. Each
    input position is one grid cell's feature, so the first layer reads what is where directly (a linear probe on
    the flattened tokens of the shapes CLIP tells the left object's colour in 0.996 of test scenes, on the pooled
    embedding in 0.81). Its first layer grows with T·D: pool the patch grid for wide encoders."""

    def __init__(self, token_dim: int, num_tokens: int, lm_hidden: int, prefix_length: int):
        super().__init__()
        self.norm = nn.LayerNorm(token_dim)  # hidden states of different encoders differ widely in scale
        self.mlp = MLPMapper(num_tokens * token_dim, lm_hidden, prefix_length)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(tokens).flatten(1))


class MultiHeadAttention(nn.Module):
    """Self-attention with bias-free query and fused key/value projections (the original's layout)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"LM hidden size {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.to_queries = nn.Linear(dim, dim, bias=False)
        self.to_keys_values = nn.Linear(dim, 2 * dim, bias=False)
        self.project = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.num_heads
        q = self.to_queries(x).view(b, n, h, c // h).transpose(1, 2)
        # The original reshapes keys_values to (b, n, 2, h, dh): all keys first, then all values.
        kv = self.to_keys_values(x).view(b, n, 2, h, c // h)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # no mask: every prefix slot sees every other
        return self.project(out.transpose(1, 2).reshape(b, n, c))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class TransformerLayer(nn.Module):
    """Pre-LayerNorm block: x + attn(norm1(x)); x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 2.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(dim, num_heads) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class TransformerMapper(nn.Module):
    """Linear(clip_dim, clip_length·h) -> (clip_length, h), concat a learned constant (k, h), transformer
    without positional embedding, keep the last k outputs."""

    def __init__(
        self,
        clip_dim: int,
        lm_hidden: int,
        prefix_length: int,
        clip_length: int,
        num_layers: int = 8,
        num_heads: int = 8,
    ):
        super().__init__()
        self.clip_length = clip_length
        self.lm_hidden = lm_hidden
        self.linear = nn.Linear(clip_dim, clip_length * lm_hidden)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, lm_hidden))
        self.transformer = Transformer(lm_hidden, num_heads, num_layers)

    def forward(self, clip_embeds: torch.Tensor) -> torch.Tensor:
        x = self.linear(clip_embeds).view(-1, self.clip_length, self.lm_hidden)
        const = self.prefix_const.unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.transformer(torch.cat((x, const), dim=1))[:, self.clip_length :]


class TokenTransformerMapper(nn.Module):
    """The Transformer mapper reading image tokens (B, T, D) instead of a linear expansion of one vector: LayerNorm
    and Linear(token_dim, h) per token plus a learned position per token slot, concat the learned constant (k, h),
    transformer; the prefix is every output, T + k vectors. The paper's mapper drops the outputs at its clip_length
    slots, linear views of one vector; here they sit on image regions, so where each thing is reaches the LM slot
    by slot (as LLaVA feeds projected patches), and the k constant slots summarise the whole image."""

    def __init__(
        self,
        token_dim: int,
        num_tokens: int,
        lm_hidden: int,
        prefix_length: int,
        num_layers: int = 8,
        num_heads: int = 8,
    ):
        super().__init__()
        self.num_tokens = num_tokens
        self.norm = nn.LayerNorm(token_dim)  # hidden states of different encoders differ widely in scale
        self.linear = nn.Linear(token_dim, lm_hidden)
        self.positions = nn.Parameter(torch.randn(num_tokens, lm_hidden) * 0.02)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, lm_hidden))
        self.transformer = Transformer(lm_hidden, num_heads, num_layers)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.linear(self.norm(tokens)) + self.positions
        const = self.prefix_const.unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.transformer(torch.cat((x, const), dim=1))
