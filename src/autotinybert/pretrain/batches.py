"""Training batches: which rows of the corpus a step, worker and micro-batch read, and their masks.

The data order is a fresh permutation per epoch, from ``(seed, epoch)``; a step holds the same
rows however it is split over workers and micro-batches; each row is masked with its own
generator, from ``(seed, step, row)``, so its masks do not depend on where it lands.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ..data import IGNORE_INDEX, PackedSplit, make_batch, mask_tokens
from ..errors import UserError
from ..training import Workers
from .sampling import derive_seed


@functools.lru_cache(maxsize=2)
def _epoch_order(num_sequences: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng(derive_seed(seed, epoch, 23)).permutation(num_sequences)


def batch_indices(num_sequences: int, batch_size: int, workers: Workers, seed: int, step: int, micro: int = 0,
                  grad_accum: int = 1) -> np.ndarray:
    """Rows of micro-batch ``micro`` of ``step`` for this worker: a fresh permutation every epoch.

    Step ``s`` trains rows ``s*G .. (s+1)*G`` of its epoch's permutation (``G = batch_size x
    workers x grad_accum``); how they are split over workers and micro-batches does not change
    which rows the step holds.
    """
    per_step = batch_size * workers.world * grad_accum
    per_epoch = num_sequences // per_step
    if per_epoch == 0:
        raise UserError(f"the corpus has {num_sequences} sequences, fewer than one global batch ({per_step}); "
                        "lower --batch-size or add text")
    epoch, within = divmod(step, per_epoch)
    start = within * per_step + (micro * workers.world + workers.rank) * batch_size
    return np.sort(_epoch_order(num_sequences, seed, epoch)[start: start + batch_size])


def masked_batch(split: PackedSplit, indices: np.ndarray, tokenizer, generators: list[torch.Generator],
                 device: torch.device) -> dict[str, torch.Tensor]:
    """A padded batch of rows ``indices``, each masked with its own generator (BERT 80/10/10).

    Per-row generators make a row's masks independent of the batch it lands in (batch width,
    neighbours, worker), which is what lets N workers reproduce one.
    """
    batch = make_batch(split, indices)
    ids, attention = batch["input_ids"], batch["attention_mask"]
    masked, labels = ids.clone(), torch.full_like(ids, IGNORE_INDEX)
    for row, generator in enumerate(generators):
        length = int(attention[row].sum())
        row_masked, row_labels = mask_tokens(ids[row: row + 1, :length], attention[row: row + 1, :length],
                                             tokenizer.all_special_ids, tokenizer.mask_token_id, len(tokenizer),
                                             generator)
        masked[row, :length], labels[row, :length] = row_masked[0], row_labels[0]
    return {"input_ids": masked.to(device), "labels": labels.to(device), "original_ids": ids.to(device),
            "attention_mask": attention.to(device)}


def row_generators(seed: int, step: int, rows: np.ndarray, stream: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(derive_seed(seed, step, int(row), stream)) for row in rows]
