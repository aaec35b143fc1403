import pytest
import torch

from clipcap.errors import ClipCapError
from clipcap.mapping import MLPMapper, TokenMLPMapper, TokenTransformerMapper, TransformerMapper, pool_tokens
from tests import original_clipcap as original


def test_mlp_shapes_and_keys():
    mapper = MLPMapper(clip_dim=16, lm_hidden=8, prefix_length=4)
    assert mapper(torch.randn(3, 16)).shape == (3, 4, 8)
    shapes = {k: tuple(v.shape) for k, v in mapper.state_dict().items()}
    assert shapes == {
        "model.0.weight": (16, 16),
        "model.0.bias": (16,),
        "model.2.weight": (32, 16),
        "model.2.bias": (32,),
    }


def test_transformer_matches_original_layout():
    torch.manual_seed(0)
    ref = original.TransformerMapper(16, 8, prefix_length=4, clip_length=3, num_layers=2, num_heads=2)
    ours = TransformerMapper(16, 8, prefix_length=4, clip_length=3, num_layers=2, num_heads=2)
    assert set(ours.state_dict()) == set(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 16)
    out = ours(x)
    assert out.shape == (5, 4, 8)
    torch.testing.assert_close(out, ref(x), atol=1e-5, rtol=1e-5)


def test_transformer_has_no_positional_embedding_and_no_qkv_bias():
    mapper = TransformerMapper(16, 8, prefix_length=4, clip_length=3, num_layers=1, num_heads=2)
    keys = set(mapper.state_dict())
    assert "transformer.layers.0.attn.to_queries.bias" not in keys
    assert "transformer.layers.0.attn.to_keys_values.bias" not in keys
    assert "transformer.layers.0.attn.project.bias" in keys
    assert not any("pos" in k for k in keys)
    # permuting the CLIP-derived slots must not change the output: attention without positions is order-free
    x = torch.randn(2, 3, 8)
    const = mapper.prefix_const.unsqueeze(0).expand(2, -1, -1)
    a = mapper.transformer(torch.cat((x, const), 1))[:, 3:]
    b = mapper.transformer(torch.cat((x[:, [2, 0, 1]], const), 1))[:, 3:]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_token_mapper_reads_tokens_in_place():
    torch.manual_seed(0)
    mapper = TokenTransformerMapper(token_dim=12, num_tokens=5, lm_hidden=8, prefix_length=4, num_layers=2, num_heads=2)
    tokens = torch.randn(3, 5, 12) * 40  # hidden states at any scale: the input LayerNorm takes it
    out = mapper(tokens)
    assert out.shape == (3, 5 + 4, 8) and torch.isfinite(out).all()  # one vector per token, then the k slots
    torch.testing.assert_close(mapper(tokens * 3), out, atol=1e-4, rtol=1e-4)
    # Unlike the pooled Transformer mapper, where a token is matters: moving the tokens changes the prefix.
    assert not torch.allclose(mapper(tokens[:, [1, 0, 2, 3, 4]]), out, atol=1e-3)
    assert {k for k in mapper.state_dict() if not k.startswith("transformer.")} == {
        "norm.weight",
        "norm.bias",
        "linear.weight",
        "linear.bias",
        "positions",
        "prefix_const",
    }


def test_token_mlp_reads_the_flattened_tokens():
    torch.manual_seed(0)
    mapper = TokenMLPMapper(token_dim=12, num_tokens=5, lm_hidden=8, prefix_length=4)
    tokens = torch.randn(3, 5, 12) * 40
    out = mapper(tokens)
    assert out.shape == (3, 4, 8)  # k vectors, as the pooled MLP gives
    torch.testing.assert_close(mapper(tokens * 3), out, atol=1e-4, rtol=1e-4)  # LayerNorm per token
    assert not torch.allclose(mapper(tokens[:, [1, 0, 2, 3, 4]]), out, atol=1e-3)  # where each token is counts
    expected = mapper.mlp(torch.nn.functional.layer_norm(tokens, (12,)).reshape(3, 60))
    torch.testing.assert_close(out, expected)
    shapes = {k: tuple(v.shape) for k, v in mapper.state_dict().items()}
    assert shapes == {
        "norm.weight": (12,),
        "norm.bias": (12,),
        "mlp.model.0.weight": (16, 60),
        "mlp.model.0.bias": (16,),
        "mlp.model.2.weight": (32, 16),
        "mlp.model.2.bias": (32,),
    }


def test_pool_tokens_grids_and_errors():
    hidden = torch.arange(2 * 10 * 3, dtype=torch.float32).view(2, 10, 3)  # class token + 3 x 3 patches
    assert pool_tokens(hidden, None) is hidden
    assert pool_tokens(hidden, 3) is hidden and pool_tokens(hidden, 7) is hidden  # the grid already fits
    one = pool_tokens(hidden, 1)
    torch.testing.assert_close(one, torch.stack((hidden[:, 0], hidden[:, 1:].mean(1)), dim=1))
    assert pool_tokens(hidden[:, 1:], 1).shape == (2, 1, 3)  # patches only (SigLIP)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ClipCapError, match="positive integer"):
            pool_tokens(hidden, bad)
    with pytest.raises(ClipCapError, match="not a square grid"):
        pool_tokens(hidden[:, :7], 2)  # 7 tokens: neither 7 nor 6 patches form a square
