"""Training pairs: the (embedding, caption) pairs of a store tokenised once, and packed plain text for LM loss.

Captions are tokenised with the LM's tokenizer, the end token appended, and padded per batch to the batch's longest
caption (not a global maximum). Unusable captions are skipped with the reason (empty, over-long, undecodable).
"""

from __future__ import annotations

from array import array
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ClipCapError


def caption_problem(caption: str) -> str | None:
    """Why a caption cannot be a training target, or None. (Stores already drop empty and null captions.)"""
    if "\ufffd" in caption:
        return "undecodable (replacement character: the text was decoded with the wrong encoding)"
    return None


def tokenize_captions(tokenizer, captions: list, max_tokens: int) -> tuple[list[list[int] | None], list[str | None]]:
    """Token ids of each caption with the end token appended, or None with the reason it was skipped."""
    eos = tokenizer.eos_token_id
    problems = [caption_problem(c) for c in captions]
    good = [c.strip() for c, p in zip(captions, problems, strict=True) if p is None]
    encoded = iter(tokenizer(good, add_special_tokens=False)["input_ids"] if good else [])
    ids: list[list[int] | None] = []
    for i, problem in enumerate(problems):
        if problem is not None:
            ids.append(None)
            continue
        tokens = next(encoded)
        if not tokens:
            problems[i] = "empty (no tokens)"
        elif len(tokens) + 1 > max_tokens:
            problems[i] = f"over-long ({len(tokens) + 1} tokens > max {max_tokens})"
        ids.append(None if problems[i] else tokens + [eos])
    return ids, problems


def pad_batch(sequences: list, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token sequences to the longest one in the batch: (input_ids, attention_mask)."""
    tensors = [torch.as_tensor(s, dtype=torch.long) for s in sequences]
    ids = nn.utils.rnn.pad_sequence(tensors, batch_first=True, padding_value=pad_id)
    lengths = torch.tensor([len(t) for t in tensors])
    return ids, (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()


class CaptionPairs:
    """The usable (embedding, caption) pairs of a store, tokenised once; `batch(rows)` builds a padded batch.

    Token ids live in one flat int32 array, so memory is a few bytes per token however large the store is.
    `image_tokens`: batches carry the store's image tokens (B, T, D) instead of its pooled embeddings."""

    def __init__(
        self,
        store,
        tokenizer,
        max_tokens: int,
        name: str = "train",
        progress: bool = False,
        image_tokens: bool = False,
    ):
        from tqdm.auto import tqdm

        self.store = store
        self.image_tokens = image_tokens
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        tokens, offsets, pairs, image = array("i"), array("q", [0]), array("q"), array("q")
        self.skipped: list[dict] = []
        keys = store.keys
        pair = 0
        chunk = 2048  # images per tokenizer call
        for start in tqdm(range(0, store.num_images, chunk), desc=f"tokenising {name} captions", disable=not progress):
            images = range(start, min(start + chunk, store.num_images))
            captions = [store.image_captions(j) for j in images]
            flat = [c for caps in captions for c in caps]
            ids, problems = tokenize_captions(tokenizer, flat, max_tokens)
            owners = [j for j, caps in zip(images, captions, strict=True) for _ in caps]
            for j, caption, seq, problem in zip(owners, flat, ids, problems, strict=True):
                if problem is None:
                    tokens.extend(seq)
                    offsets.append(offsets[-1] + len(seq))
                    pairs.append(pair)
                    image.append(j)
                else:
                    self.skipped.append(
                        {"data": name, "pair": pair, "key": keys[j], "caption": caption[:200], "reason": problem}
                    )
                pair += 1
        self.tokens = np.frombuffer(tokens, dtype=np.int32)
        self.offsets = np.frombuffer(offsets, dtype=np.int64)
        self.pairs = np.frombuffer(pairs, dtype=np.int64)
        self.image = np.frombuffer(image, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.pairs)

    def token_ids(self, row: int) -> np.ndarray:
        return self.tokens[self.offsets[row] : self.offsets[row + 1]]

    def batch(self, rows) -> dict[str, torch.Tensor]:
        """Embeddings + dynamically padded captions of the given rows (0..len-1)."""
        images = [int(self.image[r]) for r in rows]
        read = self.store.image_tokens if self.image_tokens else self.store.image_embeddings
        embeds = torch.from_numpy(read(images))
        input_ids, attention_mask = pad_batch([self.token_ids(int(r)) for r in rows], self.pad_id)
        return {"clip_embeds": embeds, "input_ids": input_ids, "attention_mask": attention_mask}

    def skip_summary(self) -> str:
        counts: dict[str, int] = {}
        for s in self.skipped:
            reason = s["reason"].split(" (", 1)[0]
            counts[reason] = counts.get(reason, 0) + 1
        return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))


class PackedText:
    """A text file tokenised into one stream (end token between lines) cut into blocks that fill the LM's context;
    batch m of process r is a pure function of (seed, m, r), so resuming needs no extra state."""

    def __init__(self, path: str | Path, tokenizer, block: int, seed: int):
        try:
            lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as e:
            raise ClipCapError(f"cannot read the LM text file {path}: {e}") from None
        lines = [line for line in lines if line]
        stream = [
            t for ids in tokenizer(lines, add_special_tokens=False)["input_ids"] for t in [*ids, tokenizer.eos_token_id]
        ]
        n = len(stream) // block
        if n == 0:
            raise ClipCapError(f"the LM text file {path} holds {len(stream)} tokens: fewer than one block of {block}")
        self.blocks = torch.tensor(stream[: n * block], dtype=torch.long).view(n, block)
        self.seed = seed
        self._perm: tuple[int, torch.Tensor] | None = None

    def _order(self, cycle: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != cycle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + cycle)
            self._perm = (cycle, torch.randperm(len(self.blocks), generator=g))
        return self._perm[1]

    def rows(self, micro_batch: int, rank: int, world: int, size: int) -> list[int]:
        """Block indices of one batch: draws go round the processes, one seeded shuffle of all blocks per cycle."""
        n = len(self.blocks)
        start = (micro_batch * world + rank) * size
        return [int(self._order(g // n)[g % n]) for g in range(start, start + size)]

    def batch(self, micro_batch: int, rank: int, world: int, size: int) -> torch.Tensor:
        return self.blocks[self.rows(micro_batch, rank, world, size)]
