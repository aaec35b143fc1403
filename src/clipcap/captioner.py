"""Captioner: images -> captions. The high-level API: CLIP encoder + ClipCapModel + tokenizer, batched."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from .decoding import DEFAULTS, SAMPLING, check_prompt, generate_kwargs, model_defaults
from .devices import resolve_device, resolve_dtype
from .errors import ClipCapError
from .exported import VISION_TOWER_KEY, ExportedModel, is_exported
from .hub import load_tokenizer, resolve_dir, resolve_model_dir_name
from .limits import MAX_BATCH_SIZE, check_decoding, check_range, context_length, fit_new_tokens, images_per_run
from .model import ClipCapModel


def _exported_tower(path: Path, file: str, config):
    """The encoder an exported complete model carries: its vision tower (`file`) and image processor."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor

    from .encoder import ImageEncoder
    from .model import ClipCapVisionTower

    if config.vision_config is None:
        raise ClipCapError(f"{path}/config.json names a vision tower ({file}) but has no vision_config")
    tower = ClipCapVisionTower(config.vision_config)
    try:
        tower.load_state_dict(load_file(str(path / file)))
        processor = AutoImageProcessor.from_pretrained(str(path))
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ClipCapError(f"cannot load the vision tower of {path} ({file}): {reason}") from None
    return ImageEncoder(tower, processor, name=str(path))


class Captioner:
    """`Captioner.from_pretrained(model_dir).caption(images)` -> list of captions.

    Decoding settings left unset (None) take the model dir's defaults (`decoding_defaults`, from its
    generation_config.json), then greedy / 67 tokens / length penalty 1.0; a default caption length is cut to what
    the LM's context leaves after the prefix and the prompt. Every setting is checked against `clipcap.limits`
    before any image is opened."""

    def __init__(
        self,
        model: ClipCapModel | ExportedModel,
        tokenizer,
        encoder,
        batch_size: int = 32,
        decoding_defaults=None,
        clip_model=None,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.clip_model = clip_model or (encoder.name if encoder is not None else None)  # the encoder it expects
        check_range("batch_size", batch_size, 1, MAX_BATCH_SIZE)
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
        load_encoder: bool = True,
    ) -> Captioner:
        """Load a model dir (or Hub repo): a ClipCapModel dir with its tokenizer and the encoder its config names
        (`clip_model=` overrides; a relative `clip_model` in the config resolves against the model dir), or a
        complete captioning dir (`save_pretrained`), whose vision tower is the encoder. `device="auto"` picks cuda
        when available; `dtype` may be a torch dtype or "float32" / "float16" / "bfloat16". `load_encoder=False` skips
        the encoder of a ClipCapModel dir (for captioning stored embeddings; `clip_model` still names it)."""
        from .config import ClipCapConfig
        from .encoder import ImageEncoder

        dtype = resolve_dtype(dtype)
        path = resolve_dir(name_or_path)
        if is_exported(path):  # written by `clipcap export`: ONNX Runtime on the CPU, in the dtypes it was exported
            device = torch.device("cpu") if device in (None, "auto") else resolve_device(device)
            if device.type != "cpu" or dtype not in (None, torch.float32):
                raise ClipCapError(f"{path} is an exported model: it runs on the CPU with the dtypes it was exported")
            model = ExportedModel.from_pretrained(path)
        else:
            device = None if device is None else resolve_device(device)
            config = ClipCapConfig.from_pretrained(path)
            if config.vision_config is not None and clip_model is None:
                return cls._from_complete_dir(path, device, dtype, batch_size)
            model = ClipCapModel.from_pretrained(path, device=device, dtype=dtype)
        has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))
        lm = None if has_tokenizer else resolve_model_dir_name(model.config.lm, path, "language model", "lm")
        tokenizer = load_tokenizer(path if has_tokenizer else lm)
        defaults = model_defaults(path)
        tower = model.export.get(VISION_TOWER_KEY) if isinstance(model, ExportedModel) else None
        if tower is not None and clip_model is None:  # an exported complete dir: the encoder is in it
            encoder = _exported_tower(path, tower, model.config) if load_encoder else None
            return cls(
                model, tokenizer, encoder, batch_size=batch_size, decoding_defaults=defaults, clip_model=str(path)
            )
        name = clip_model or model.config.clip_model
        if not name:
            raise ClipCapError(f"{path}/config.json names no clip_model: name the encoder to use")
        if clip_model is None:  # the config's name: the model dir first, never the working directory
            try:
                name = resolve_model_dir_name(name, path, "CLIP encoder", "clip_model")
            except ClipCapError:
                if load_encoder:
                    raise
                # stored vectors need no encoder: its name is only compared with the store's
        encoder = ImageEncoder.from_pretrained(name, device=device, dtype=dtype) if load_encoder else None
        return cls(model, tokenizer, encoder, batch_size=batch_size, decoding_defaults=defaults, clip_model=name)

    @property
    def encoder_info(self) -> dict:
        """Which encoder this captioner uses (or expects, without one): its name or path and the content hash of
        its weight files (None for a Hub id), as info.json and metrics.json record it."""
        from .encoder import fingerprint

        return {"clip_model": self.clip_model, "clip_fingerprint": fingerprint(str(self.clip_model))}

    @classmethod
    def _from_complete_dir(cls, path: Path, device, dtype, batch_size: int) -> Captioner:
        from .encoder import ImageEncoder
        from .model import ClipCapForImageCaptioning
        from .processing import ClipCapProcessor

        complete = ClipCapForImageCaptioning.from_pretrained(path, device=device, dtype=dtype)
        try:
            processor = ClipCapProcessor.from_pretrained(str(path))
        except (OSError, ValueError, TypeError) as e:
            raise ClipCapError(f"cannot load the image processor and tokenizer of {path}: {e}") from None
        encoder = ImageEncoder(complete.vision_tower, processor.image_processor, name=str(path))
        return cls(
            complete.model,
            processor.tokenizer,
            encoder,
            batch_size=batch_size,
            decoding_defaults=model_defaults(path),
            clip_model=str(path),
        )

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> Path:
        """Write a complete captioning dir: vision tower + mapper + LM (`ClipCapForImageCaptioning`), processor
        (image processor + tokenizer) and generation_config.json, loadable by `pipeline("image-text-to-text")`,
        `AutoModelForImageTextToText` / `AutoProcessor` (with `trust_remote_code=True` where clipcap is not
        installed) and by `Captioner.from_pretrained`. kwargs go to transformers' `save_pretrained`."""
        from .model import ClipCapForImageCaptioning
        from .processing import ClipCapProcessor

        out = Path(save_directory)
        ClipCapForImageCaptioning.from_parts(self.model, self.encoder.model).save_pretrained(out, **kwargs)
        ClipCapProcessor(self.encoder.processor, self.tokenizer).save_pretrained(str(out))
        return out

    @property
    def device(self) -> torch.device:
        device = getattr(self.model, "device", None)  # an ExportedModel has no parameters
        return device if device is not None else next(self.model.parameters()).device

    def model_inputs(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """What the model reads for preprocessed images: pooled CLIP features (B, clip_dim), or the vision tower's
        last hidden states (B, T, D), pooled to the model's token grid, when the model reads image tokens."""
        if self.model.config.token_shape is None:
            return self.encoder.encode_pixels(pixel_values)
        return self.encoder.encode_pixels_and_tokens(pixel_values, self.model.config.token_grid)[1]

    def decode(self, ids: torch.Tensor, prompt_ids: list[int] | None = None) -> list[str]:
        """Token rows -> clean strings: cut after the stop token, special tokens dropped, whitespace stripped.
        With `prompt_ids`, each caption is the prompt followed by its continuation."""
        stop = self.model.config.stop_token_id
        texts = []
        for row in ids.tolist():
            if stop is not None and stop in row:
                row = row[: row.index(stop) + 1]
            texts.append(self.tokenizer.decode((prompt_ids or []) + row, skip_special_tokens=True).strip())
        return texts

    def decoding(
        self,
        options=None,
        num_return_sequences: int = 1,
        num_beams: int | None = None,
        max_new_tokens: int | None = None,
        **generate_options,
    ) -> dict:
        """The checked `generate` settings (prompt included) for `caption_with`: given values, then `options` (a
        DecodingOptions), then the model's defaults, then DEFAULTS; a default `max_new_tokens` is cut to what the
        LM's context leaves. ClipCapError for a value outside `clipcap.limits`, prefix + prompt + new tokens past the
        context, or a setting that would do nothing (sampling settings without sampling, a length penalty with one
        beam, a prompt for an exported model). Cheap: called before any image is opened."""
        given = {"num_beams": num_beams, "max_new_tokens": max_new_tokens, **generate_options}
        chosen = {k for k, v in given.items() if v is not None}
        optional = (*DEFAULTS, *SAMPLING, "prompt")
        from_options = {k for k in optional if getattr(options, k, None) is not None} - chosen
        kwargs = generate_kwargs(options, self.decoding_defaults, **given)
        kwargs.update({k: v for k, v in generate_options.items() if k not in kwargs and v is not None})
        # A setting that would do nothing is an error when given here; one from `options` that a given value turns
        # off (a request asking for greedy decoding from a sampling server) is dropped.
        if not kwargs.get("do_sample"):
            unused = [k for k in ("temperature", "top_p", "top_k") if k in kwargs]
            if unused and unused[0] in chosen:
                raise ClipCapError(f"`{unused[0]}` only applies when sampling: set `do_sample` too")
            kwargs = {k: v for k, v in kwargs.items() if k not in unused}
        if kwargs["num_beams"] == 1 and (
            "length_penalty" in chosen or ("length_penalty" in from_options and "num_beams" not in chosen)
        ):
            raise ClipCapError("`length_penalty` only applies to beam search: `num_beams` is 1")
        prompt = kwargs.get("prompt")
        check_prompt(prompt)
        if prompt and isinstance(self.model, ExportedModel):
            raise ClipCapError("an exported model cannot continue a prompt: caption with the model dir it came from")
        prompt_tokens = len(self._prompt_ids(prompt))
        context, prefix = context_length(self.model.lm.config), self.model.config.prefix_tokens
        if "max_new_tokens" not in chosen | from_options:  # a default never fails: it is cut to the room left
            kwargs["max_new_tokens"] = fit_new_tokens(kwargs["max_new_tokens"], context, prefix, prompt_tokens)
        check_decoding(
            num_beams=kwargs["num_beams"],
            max_new_tokens=kwargs["max_new_tokens"],
            num_return_sequences=num_return_sequences,
            do_sample=kwargs.get("do_sample", False),
            temperature=kwargs.get("temperature"),
            top_p=kwargs.get("top_p"),
            repetition_penalty=kwargs.get("repetition_penalty"),
            context=context,
            prefix_tokens=prefix,
            prompt_tokens=prompt_tokens,
        )
        return kwargs

    def _prompt_ids(self, prompt: str | None) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []

    def caption_embeddings(
        self,
        clip_embeds: torch.Tensor,
        num_beams: int | None = None,
        max_new_tokens: int | None = None,
        num_return_sequences: int = 1,
        prompt: str | None = None,
        **generate_options,
    ) -> list[str] | list[list[str]]:
        """Captions for precomputed CLIP embeddings (B, clip_dim), or image tokens (B, T, D) for a model that reads
        them, in batches of `batch_size`. With `prompt` (e.g. "a picture of"), each caption continues it and starts
        with it. Other keyword arguments (length_penalty, do_sample, temperature, top_p, ...) go to `generate`."""
        settings = self.decoding(
            None, num_return_sequences, num_beams, max_new_tokens, prompt=prompt, **generate_options
        )
        return self.caption_with(clip_embeds, settings, num_return_sequences)

    def caption_with(
        self, clip_embeds: torch.Tensor, settings: dict, num_return_sequences: int = 1
    ) -> list[str] | list[list[str]]:
        """`caption_embeddings` with settings already resolved and checked by `decoding` (jobs and the server resolve
        them once, before any work). Each `generate` run decodes at most `limits.MAX_SEQUENCES` sequences."""
        kwargs = dict(settings)
        prompt_ids = self._prompt_ids(kwargs.pop("prompt", None))
        step = images_per_run(self.batch_size, kwargs["num_beams"], num_return_sequences)
        out: list = []
        for i in range(0, len(clip_embeds), step):
            chunk = clip_embeds[i : i + step].to(self.device)
            prompts = torch.tensor([prompt_ids] * len(chunk), dtype=torch.long) if prompt_ids else None
            ids = self.model.generate(chunk, num_return_sequences=num_return_sequences, input_ids=prompts, **kwargs)
            texts = self.decode(ids, prompt_ids)
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
        prompt: str | None = None,
        candidates: int | None = None,
        rerank: str = "none",
        rerank_weight: float = 0.0,
        scores: bool = False,
        **generate_options,
    ) -> list[str] | list[list[str]]:
        """Caption PIL images or paths (one or a list). Returns one string per image, or a list of
        `num_return_sequences` strings per image when that is > 1; with `prompt`, captions continue it. A bad
        image raises ImageLoadError. `candidates` N generates N captions per image and keeps the search's best, or
        with `rerank="clip"` the one with the highest CLIPScore (+ `rerank_weight` x mean token log-probability);
        `scores=True` returns a `rerank.Scored` per image instead (caption, clip_score, logprob, runners_up)."""
        from .images import open_image

        if isinstance(images, (str, Path, Image.Image)):
            images = [images]
        if candidates is not None or rerank != "none" or scores:
            from .rerank import caption_images

            if num_return_sequences != 1:
                raise ClipCapError("several captions per image come as `candidates` when scoring or reranking")
            kept = caption_images(
                self, images, candidates, rerank, rerank_weight, num_beams, max_new_tokens, prompt, **generate_options
            )
            return kept if scores else [s.caption for s in kept]
        # every setting is checked before the first image is opened
        settings = self.decoding(
            None, num_return_sequences, num_beams, max_new_tokens, prompt=prompt, **generate_options
        )
        out: list = []
        for i in range(0, len(images), self.batch_size):
            sources = images[i : i + self.batch_size]
            chunk = [open_image(im) for im in sources]
            names = [im if isinstance(im, (str, Path)) else "<PIL image>" for im in sources]
            embeds = self.model_inputs(self.encoder.preprocess(chunk, [str(n) for n in names]))
            out.extend(self.caption_with(embeds, settings, num_return_sequences))
        return out
