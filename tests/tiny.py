"""Tiny random models and tokenizers built on the fly (no network): the test suite's stand-ins for CLIP/GPT-2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedTokenizerFast,
)

from clipcap import ClipCapConfig, ClipCapModel

CORPUS = [
    "a large red circle on the left.",
    "a small blue square above a green triangle.",
    "a yellow triangle below a purple circle.",
    "an orange square on the right.",
    "a photo of a dog on a beach.",
    "two people riding bikes down the street.",
]
EOS = "<|endoftext|>"


def tiny_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style) trained on a few sentences; eos doubles as pad."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=EOS)


def tiny_gpt2(vocab_size: int, seed: int = 0, hidden: int = 32) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=128,
        n_embd=hidden,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def tiny_opt(vocab_size: int, seed: int = 0) -> OPTForCausalLM:
    torch.manual_seed(seed)
    config = OPTConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=2,
        max_position_embeddings=128,
        word_embed_proj_dim=32,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return OPTForCausalLM(config).eval()


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def tiny_clip(vocab_size: int, seed: int = 0, image_size: int = 32, projection_dim: int = 16) -> CLIPModel:
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=8,
        ),
        projection_dim=projection_dim,
    )
    return CLIPModel(config).eval()


def save_lm_dir(path: Path, lm, tokenizer) -> Path:
    lm.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_clip_dir(path: Path, clip: CLIPModel, tokenizer, image_size: int = 32) -> Path:
    clip.save_pretrained(path)
    CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_config(mapping: str = "mlp", lm_name: str = "tiny-lm", **overrides) -> ClipCapConfig:
    fields = dict(
        lm=lm_name,
        clip_model="clip",
        clip_dim=16,
        prefix_length=4,
        mapping=mapping,
        num_layers=2,
        num_heads=2,
        tune_lm=mapping == "mlp",
        clip_length=3 if mapping == "transformer" else None,
    )
    fields.update(overrides)
    return ClipCapConfig(**fields)


def tiny_model(mapping: str = "mlp", lm=None, seed: int = 0, lm_name: str = "tiny-lm", **overrides) -> ClipCapModel:
    lm = lm if lm is not None else tiny_gpt2(300, seed=seed)
    torch.manual_seed(seed + 1)
    overrides.setdefault("stop_token_id", 0)
    config = tiny_config(mapping, lm_name=lm_name, **overrides)
    return ClipCapModel(config, lm=lm).eval()


def load_lm(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def varied_lm(make=tiny_gpt2, vocab_size: int = 300, seed: int = 0):
    """A tiny LM (from tiny_gpt2 / tiny_opt / tiny_llama) with untied, large random weights. The default tiny LMs
    mostly repeat one token, which would let a broken cache, position or decoding step go unnoticed."""
    config = make(vocab_size).config
    config.tie_word_embeddings = False
    config.initializer_range = 0.3
    torch.manual_seed(seed)
    return type(make(vocab_size))(config).eval()


def make_store(path: Path, seed: int = 0, n: int = 12) -> Path:
    """`n` random 16-d vectors (shards of 5), each with one CORPUS caption, in a store naming encoder "clip"."""
    from clipcap.data.store import StoreWriter

    rng = np.random.default_rng(seed)
    with StoreWriter(path, clip_model="clip", clip_dim=16, normalized=False, shard_size=5) as w:
        for i in range(n):
            w.add(rng.normal(size=16), f"k{i}", [CORPUS[i % len(CORPUS)]])
    return path
