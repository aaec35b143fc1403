"""Decoding record images in DataLoader workers, overlapped with the model's work in the main process.

Each batch comes back as (indices of the images that decoded, their stacked pixel values, [(index, reason)] of those
that did not): a bad image becomes a reason, never an exception that would end the job.
"""

from __future__ import annotations

import torch

from ..images import ImageLoadError, check_resize
from .sources import Record, open_record_image


class RecordImages(torch.utils.data.Dataset):
    """Decodes and preprocesses one record's image (in a DataLoader worker); a bad image becomes a reason string."""

    def __init__(self, records: list[Record], processor):
        self.records = records
        self.processor = processor

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        try:
            image = open_record_image(self.records[i])
            check_resize([image], self.processor, [self.records[i].key])
            return i, self.processor(images=[image], return_tensors="pt")["pixel_values"][0], None
        except ImageLoadError as e:
            return i, None, e.reason
        except Exception as e:  # a bad item must never end the job; its reason is reported instead
            return i, None, f"preprocessing failed ({type(e).__name__}: {e})"


def _collate(items):
    good = [(i, pixels) for i, pixels, _ in items if pixels is not None]
    bad = [(i, reason) for i, _, reason in items if reason is not None]
    pixels = torch.stack([p for _, p in good]) if good else None
    return [i for i, _ in good], pixels, dict(bad)


def _worker_init(_):
    torch.set_num_threads(1)  # decoding workers share the cores with the model's forward pass


def image_loader(records: list[Record], processor, batches: list[list[int]], workers: int, pin_memory: bool = False):
    """A DataLoader yielding (indices, pixel_values or None, {index: reason}) for each batch of record indices, in
    order; `workers` processes decode ahead of the consumer (0: in the calling process)."""
    return torch.utils.data.DataLoader(
        RecordImages(records, processor),
        batch_sampler=batches,
        num_workers=min(workers, len(batches)),
        collate_fn=_collate,
        worker_init_fn=_worker_init if workers else None,
        pin_memory=pin_memory,
    )
