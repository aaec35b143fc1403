"""ClipCapProcessor: the CLIP encoder's image processor + the LM's tokenizer, one object as transformers expects.

`processor(images=..., text=...)` gives `pixel_values` and the prompts as left-padded `input_ids` /
`attention_mask` (an empty prompt, or none, gives the plain caption); `post_process_image_text_to_text` decodes what
`ClipCapForImageCaptioning.generate` returns. This is what `pipeline("image-text-to-text")` and `AutoProcessor`
load. Like config.py and model.py, this file is copied into saved model dirs for `trust_remote_code=True`.
"""

from __future__ import annotations

import torch
from transformers import BatchFeature, ProcessorMixin

from .errors import ClipCapError
from .images import check_resize


class ClipCapProcessor(ProcessorMixin):
    """Images (and optional prompts to continue) -> model inputs; generated ids -> captions."""

    def __init__(self, image_processor, tokenizer, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)

    def __call__(self, images=None, text=None, return_tensors="pt", **kwargs) -> BatchFeature:
        """`text`: one prompt for every image, or one per image ("" or None: no prompt). Other keyword arguments
        (e.g. the pipeline's `padding`) are accepted and ignored: prompts are always left-padded. A PIL image the
        image processor would resize past `limits.MAX_RESIZED_PIXELS` is an ImageLoadError before it runs."""
        if images is None:
            raise ClipCapError("ClipCap captions images: pass images")
        pils = [im for im in (images if isinstance(images, (list, tuple)) else [images]) if hasattr(im, "size")]
        check_resize([im for im in pils if isinstance(im.size, tuple)], self.image_processor)  # before it runs
        pixel_values = self.image_processor(images, return_tensors="pt")["pixel_values"]
        n = len(pixel_values)
        prompts = [text or ""] * n if text is None or isinstance(text, str) else list(text)
        if len(prompts) != n or not all(isinstance(p, str) for p in prompts):
            raise ClipCapError(f"pass one prompt string for all {n} images or one per image, got {text!r}")
        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] if p else [] for p in prompts]
        width = max(map(len, ids), default=0)
        pad = next((t for t in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id) if t is not None), 0)
        input_ids = torch.full((n, width), pad, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        for row, tokens in enumerate(ids):
            if tokens:
                input_ids[row, width - len(tokens) :] = torch.tensor(tokens)
                attention_mask[row, width - len(tokens) :] = 1
        data = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}
        return BatchFeature(data, tensor_type=return_tensors)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs) -> list[str]:
        """Token rows -> captions, special tokens dropped and whitespace stripped (as Captioner returns them)."""
        texts = self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)
        return [t.strip() for t in texts]

    @property
    def model_input_names(self) -> list[str]:
        return ["pixel_values", "input_ids", "attention_mask"]


ClipCapProcessor.register_for_auto_class("AutoProcessor")
