"""Captioner: images -> captions. The high-level API: CLIP encoder + ClipCapModel + tokenizer, batched."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from .decoding import generate_kwargs, model_defaults
from .devices import resolve_device, resolve_dtype
from .errors import ClipCapError
from .hub import load_tokenizer, resolve_dir
from .model import ClipCapModel


class Captioner:
    """`Captioner.from_pretrained(model_dir).caption(images)` -> list of captions.

    Decoding settings left unset (None) take the model dir's defaults (`decoding_defaults`, from its
    generation_config.json), then greedy / 67 tokens / length penalty 1.0."""

    def __init__(self, model: ClipCapModel, tokenizer, encoder, batch_size: int = 32, decoding_defaults=None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.batch_size = batch_size
        self.decoding_defaults = dict(decoding_defaults or {})
        if encoder is not None and encoder.dim != model.config.clip_dim:
            raise ClipCapError(
                f"the encoder {encoder.name} gives {encoder.dim}-d features but the model expects "
                f"clip_dim={model.config.clip_dim}"
            )
        tokens = model.config.token_shape
        if encoder is not None and tokens is not None and encoder.token_dim != tokens[1]:
            raise ClipCapError(
                f"the encoder {encoder.name} gives {encoder.token_dim}-wide image tokens but the model reads "
                f"{tokens[1]}-wide ones"
            )

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        clip_model: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        batch_size: int = 32,
    ) -> Captioner:
        """Load the model dir, its tokenizer and the encoder its config names (`clip_model=` overrides;
        a relative `clip_model` in the config resolves against the model dir). `device="auto"` picks cuda when
        available; `dtype` may be a torch dtype or "float32" / "float16" / "bfloat16"."""
        from .encoder import ImageEncoder

        device = None if device is None else resolve_device(device)
        dtype = resolve_dtype(dtype)
        path = resolve_dir(name_or_path)
        model = ClipCapModel.from_pretrained(path, device=device, dtype=dtype)
        has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))
        tokenizer = load_tokenizer(path if has_tokenizer else model.config.lm)
        name = clip_model or model.config.clip_model
        if not name:
            raise ClipCapError(f"{path}/config.json names no clip_model: name the encoder to use")
        if not Path(name).is_absolute() and (path / name).is_dir() and clip_model is None:
            name = str(path / name)
        encoder = ImageEncoder.from_pretrained(name, device=device, dtype=dtype)
        return cls(model, tokenizer, encoder, batch_size=batch_size, decoding_defaults=model_defaults(path))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def model_inputs(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """What the model reads for preprocessed images: pooled CLIP features (B, clip_dim), or the vision tower's
        last hidden states (B, T, D), pooled to the model's token grid, when the model reads image tokens."""
        if self.model.config.token_shape is None:
            return self.encoder.encode_pixels(pixel_values)
        return self.encoder.encode_pixels_and_tokens(pixel_values, self.model.config.token_grid)[1]

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Token rows -> clean strings: cut after the stop token, special tokens dropped, whitespace stripped."""
        stop = self.model.config.stop_token_id
        texts = []
        for row in ids.tolist():
            if stop is not None and stop in row:
                row = row[: row.index(stop) + 1]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return texts

    def caption_embeddings(
        self,
        clip_embeds: torch.Tensor,
        num_beams: int | None = None,
        max_new_tokens: int | None = None,
        num_return_sequences: int = 1,
        **generate_options,
    ) -> list[str] | list[list[str]]:
        """Captions for precomputed CLIP embeddings (B, clip_dim), or image tokens (B, T, D) for a model that reads
        them, in batches of `batch_size`. Other keyword arguments (length_penalty, do_sample, temperature, top_p,
        ...) go to `generate`."""
        kwargs = generate_kwargs(
            defaults=self.decoding_defaults, num_beams=num_beams, max_new_tokens=max_new_tokens, **generate_options
        )
        kwargs.update({k: v for k, v in generate_options.items() if k not in kwargs and v is not None})
        if num_return_sequences > kwargs["num_beams"] and not kwargs.get("do_sample"):
            raise ClipCapError(
                f"{num_return_sequences} captions per image need at least {num_return_sequences} beams or sampling"
            )
        out: list = []
        for i in range(0, len(clip_embeds), self.batch_size):
            chunk = clip_embeds[i : i + self.batch_size].to(self.device)
            ids = self.model.generate(chunk, num_return_sequences=num_return_sequences, **kwargs)
            texts = self.decode(ids)
            if num_return_sequences == 1:
                out.extend(texts)
            else:
                out.extend(texts[j : j + num_return_sequences] for j in range(0, len(texts), num_return_sequences))
        return out

    def caption(
        self,
        images,
        num_beams: int | None = None,
        max_new_tokens: int | None = None,
        num_return_sequences: int = 1,
        **generate_options,
    ) -> list[str] | list[list[str]]:
        """Caption PIL images or paths (one or a list). Returns one string per image, or a list of
        `num_return_sequences` strings per image when that is > 1. A bad image raises ImageLoadError."""
        from .images import open_image

        if isinstance(images, (str, Path, Image.Image)):
            images = [images]
        out: list = []
        for i in range(0, len(images), self.batch_size):
            chunk = [open_image(im) for im in images[i : i + self.batch_size]]
            embeds = self.model_inputs(self.encoder.preprocess(chunk))
            out.extend(
                self.caption_embeddings(embeds, num_beams, max_new_tokens, num_return_sequences, **generate_options)
            )
        return out
