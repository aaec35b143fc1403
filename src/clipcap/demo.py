"""`clipcap demo`: for now, caption a few generated images with a tiny *randomly initialised* model.

This exercises the real pipeline (model dir -> Captioner -> captions) offline; the captions are noise until the
shapes-world demo trains real weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from .captioner import Captioner
from .config import ClipCapConfig
from .model import ClipCapModel

WORDS = "a small large red green blue yellow purple orange circle square triangle on the left right above below of ."


def _images(out: Path) -> list[Path]:
    paths = []
    for i, colour in enumerate(["red", "green", "blue", "yellow"]):
        img = Image.new("RGB", (64, 64), (235, 235, 235))
        ImageDraw.Draw(img).ellipse((12 + i * 4, 12, 44 + i * 4, 44), fill=colour)
        paths.append(out / f"image_{i}.png")
        img.save(paths[-1])
    return paths


def _random_model_dir(out: Path) -> Path:
    torch.manual_seed(0)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([WORDS] * 4, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    clip = CLIPModel(
        CLIPConfig(
            text_config=dict(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
            ),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=32,
                patch_size=8,
            ),
            projection_dim=32,
        )
    )
    model_dir = out / "model"
    clip.save_pretrained(model_dir / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        model_dir / "clip"
    )
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2))
    config = ClipCapConfig(
        lm="random-gpt2",
        clip_model="clip",
        clip_dim=32,
        prefix_length=4,
        stop_token_id=tokenizer.convert_tokens_to_ids("."),
    )
    ClipCapModel(config, lm=lm).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def run_demo(out: str | Path) -> None:
    """Write a random tiny model dir and sample images under `out`, caption them, print JSON lines."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    print("clipcap demo: tiny RANDOMLY INITIALISED model (no training yet) -- captions are noise.", flush=True)
    captioner = Captioner.from_pretrained(_random_model_dir(out))
    images = _images(out)
    for path, caption in zip(images, captioner.caption(images, max_new_tokens=12), strict=True):
        print(json.dumps({"image": str(path), "caption": caption}))
