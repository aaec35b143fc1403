"""Test-side re-implementation of rmokady/CLIP_prefix_caption's modules, with the original key names.

Used to write original-style checkpoints (including the stale GPT-2 buffers) and to compute reference logits.
Kept close to the original code on purpose (einsum attention, separate reshape order), so the converter and our
mapping networks are checked against an independent implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf
from torch import nn


class MLP(nn.Module):
    def __init__(self, sizes):
        super().__init__()
        layers = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < len(sizes) - 2:
                layers.append(nn.Tanh())
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


class MlpTransformer(nn.Module):
    def __init__(self, in_dim, h_dim):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, h_dim)
        self.fc2 = nn.Linear(h_dim, in_dim)

    def forward(self, x):
        return self.fc2(nnf.relu(self.fc1(x)))


class MultiHeadAttention(nn.Module):
    def __init__(self, dim_self, dim_ref, num_heads, bias=False):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim_self // num_heads) ** -0.5
        self.to_queries = nn.Linear(dim_self, dim_self, bias=bias)
        self.to_keys_values = nn.Linear(dim_ref, dim_self * 2, bias=bias)
        self.project = nn.Linear(dim_self, dim_self)

    def forward(self, x):
        b, n, c = x.shape
        queries = self.to_queries(x).reshape(b, n, self.num_heads, c // self.num_heads)
        keys_values = self.to_keys_values(x).reshape(b, n, 2, self.num_heads, c // self.num_heads)
        keys, values = keys_values[:, :, 0], keys_values[:, :, 1]
        attention = torch.einsum("bnhd,bmhd->bnmh", queries, keys) * self.scale
        attention = attention.softmax(dim=2)
        out = torch.einsum("bnmh,bmhd->bnhd", attention, values).reshape(b, n, c)
        return self.project(out)


class TransformerLayer(nn.Module):
    def __init__(self, dim_self, num_heads, mlp_ratio=2.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim_self)
        self.attn = MultiHeadAttention(dim_self, dim_self, num_heads)
        self.norm2 = nn.LayerNorm(dim_self)
        self.mlp = MlpTransformer(dim_self, int(dim_self * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, dim_self, num_heads, num_layers):
        super().__init__()
        self.layers = nn.ModuleList([TransformerLayer(dim_self, num_heads) for _ in range(num_layers)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class TransformerMapper(nn.Module):
    def __init__(self, dim_clip, dim_embedding, prefix_length, clip_length, num_layers=8, num_heads=8):
        super().__init__()
        self.clip_length = clip_length
        self.transformer = Transformer(dim_embedding, num_heads, num_layers)
        self.linear = nn.Linear(dim_clip, clip_length * dim_embedding)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, dim_embedding), requires_grad=True)

    def forward(self, x):
        x = self.linear(x).view(x.shape[0], self.clip_length, -1)
        prefix = self.prefix_const.unsqueeze(0).expand(x.shape[0], *self.prefix_const.shape)
        prefix = torch.cat((x, prefix), dim=1)
        return self.transformer(prefix)[:, self.clip_length :]


class ClipCaptionModel(nn.Module):
    """The original model: `clip_project` mapper + `gpt` LM (any HF causal LM here, GPT-2 in the original)."""

    def __init__(self, gpt, prefix_length, clip_length=None, prefix_size=512, num_layers=8, mapping="mlp", num_heads=8):
        super().__init__()
        self.prefix_length = prefix_length
        self.gpt = gpt
        self.gpt_embedding_size = gpt.get_input_embeddings().weight.shape[1]
        if mapping == "mlp":
            self.clip_project = MLP(
                (
                    prefix_size,
                    (self.gpt_embedding_size * prefix_length) // 2,
                    self.gpt_embedding_size * prefix_length,
                )
            )
        else:
            self.clip_project = TransformerMapper(
                prefix_size, self.gpt_embedding_size, prefix_length, clip_length, num_layers, num_heads
            )

    def forward(self, tokens, prefix, mask=None):
        embedding_text = self.gpt.get_input_embeddings()(tokens)
        prefix_projections = self.clip_project(prefix).view(-1, self.prefix_length, self.gpt_embedding_size)
        embedding_cat = torch.cat((prefix_projections, embedding_text), dim=1)
        return self.gpt(inputs_embeds=embedding_cat, attention_mask=mask).logits


def original_state_dict(model: ClipCaptionModel) -> dict[str, torch.Tensor]:
    """state_dict() as an old transformers GPT-2 produced it: with the stale attn.bias / masked_bias buffers."""
    state = dict(model.state_dict())
    n_layer = getattr(model.gpt.config, "n_layer", None)
    if n_layer is not None:  # GPT-2 only
        n = model.gpt.config.n_positions
        for i in range(n_layer):
            state[f"gpt.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n)
            state[f"gpt.transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return state
