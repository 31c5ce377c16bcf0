"""Which sub-models pre-training trains and validates, and the seeds every random choice derives from.

* `derive_seed`: every random choice of step ``s`` is derived from ``(seed, s, ...)`` (the
  determinism rule of `autotinybert.pretrain`).
* Sampling (`ArchSampler`): ``random`` draws one sub-model per step, the same on every worker
  (official behaviour); ``per-worker`` lets each process draw its own; ``sandwich`` trains the
  largest, the smallest and ``k`` random sub-models each step. ``--samples-per-batch`` sums the
  gradients of several draws (official ``sample_times_per_batch``).
* The space a run samples from (`resolve_space`): ``--space`` within the ``--max-*`` limits, or
  the one architecture of further training (``--arch``, `point_space`); `validation_panel`: the
  architectures validated every ``--eval-every`` steps.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from ..settings import PretrainSettings
from ..space import RELEASED, Arch, Dim, SearchSpace


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers: independent streams per (seed, step, worker, micro-batch)."""
    digest = hashlib.sha256(",".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class ArchSampler:
    space: SearchSpace
    rule: str = "random"
    samples_per_batch: int = 1
    seed: int = 0

    def archs(self, step: int, rank: int) -> list[Arch]:
        """Architectures trained at ``step`` by worker ``rank`` (gradients summed over them)."""
        worker = rank if self.rule == "per-worker" else 0
        rng = random.Random(derive_seed(self.seed, step, worker, 17))
        draws = [self.space.sample(rng) for _ in range(self.samples_per_batch)]
        if self.rule == "sandwich":
            return [self.space.largest(), self.space.smallest(), *draws]
        return draws


def point_space(arch: Arch) -> SearchSpace:
    """A space holding only ``arch``: further training of one architecture reuses the SuperPLM code.

    The kd form keeps every head and trims nothing, so any head width works.
    """
    def only(value: int) -> Dim:
        return Dim(value, value, 1)

    return SearchSpace(mode="kd", layers=only(arch.num_hidden_layers), hidden=only(arch.hidden_size),
                       ffn=only(arch.intermediate_size), heads=only(arch.num_attention_heads),
                       qkv=Dim(arch.qkv_size, arch.qkv_size, arch.num_attention_heads))


def validation_panel(space: SearchSpace) -> list[Arch]:
    """Smallest, largest, a middle one and the released architectures that fit the space."""
    panel = [space.smallest(), _middle(space), space.largest()]
    panel += [item.arch for item in RELEASED if item.mode == space.mode and space.contains(item.arch)]
    return list(dict.fromkeys(panel))


def _middle(space: SearchSpace) -> Arch:
    layers = space.layers.snap((space.layers.min + space.layers.max) // 2)
    hidden = space.hidden.snap((space.hidden.min + space.hidden.max) // 2)
    ffn = space.ffn.snap((space.ffn.min + space.ffn.max) // 2)
    if space.mode == "mlm":
        heads = space.heads.snap((space.heads.min + space.heads.max) // 2)
        return Arch(layers, hidden, ffn, heads, heads * space.head_size)
    qkv = space.qkv.snap((space.qkv.min + space.qkv.max) // 2)
    return Arch(layers, hidden, ffn, space.heads.min, qkv)


def resolve_space(settings: PretrainSettings) -> SearchSpace:
    if settings.arch:
        return point_space(Arch.parse(settings.arch))
    return SearchSpace.load(settings.space).with_limits(**settings.space_limits)
