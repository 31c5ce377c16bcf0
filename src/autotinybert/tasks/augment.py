"""Teacher-labelled augmentation for task distillation (TinyBERT's data augmentation, simplified):
each training row gets copies with a share of its word pieces replaced by word pieces drawn from the
training text itself, and the teacher labels every copy. The student then learns the teacher's
function on inputs near the task's data, not only at its few thousand rows.

TinyBERT replaces words with a masked language model's or GloVe's neighbours; the sources this
project starts from often have no MLM head, so the replacements here are drawn from the task's own
word-piece frequencies, which keeps the domain's vocabulary without any extra model.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from typing import Sequence


def perturbed_copies(features: Sequence[dict], copies: int, rate: float, seed: int,
                     special_ids: set[int]) -> list[dict]:
    """``copies`` variants of every feature, in order (row 0's copies first), each non-special token
    replaced with probability ``rate`` by a token drawn from the features' token frequencies. The
    copies' labels are placeholders until `relabel` gives them the teacher's."""
    counts = Counter(t for f in features for t in f["input_ids"] if t not in special_ids)
    tokens, weights = zip(*sorted(counts.items())) if counts else ((), ())
    cumulative = list(itertools.accumulate(weights))
    rng = random.Random(seed)

    def perturbed(ids: list[int]) -> list[int]:
        return [t if t in special_ids or rng.random() >= rate else rng.choices(tokens, cum_weights=cumulative)[0]
                for t in ids]

    return [{**feature, "input_ids": perturbed(feature["input_ids"])} for feature in features for _ in range(copies)]


def relabel(features: list[dict], labels: Sequence) -> None:
    """Give ``features`` the teacher's labels (class index, or score for a regression task), in place."""
    if len(features) != len(labels):
        raise ValueError(f"{len(labels)} labels for {len(features)} features")
    for feature, label in zip(features, labels):
        feature["labels"] = label
