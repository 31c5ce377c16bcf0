"""Architectures (`Arch`) and the search spaces they live in (`SearchSpace`).

AutoTinyBERT (Yin et al., ACL 2021, §3 and Table 1) searches five hyper-parameters of a
homogeneous BERT encoder: layers, hidden size d_m, FFN size d_f, heads h and q/k/v width
d_qkv. Two spaces exist:

* **mlm** – head size fixed (64 in the paper), so ``qkv_size = head_size * heads``; heads searched.
* **kd** – heads fixed (12, to match a 12-head teacher); ``qkv_size`` searched in multiples
  of the head count, every head gets ``qkv_size / heads`` dims.

Membership (`SearchSpace.contains`) is ranges + structural rules; the steps only say which
points `sample` / `grid` / `mutate` visit. The released S1 has FFN 1054, which is off the
step-4 training grid but inside the space.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import UserError

ARCH_FIELDS = (
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "qkv_size",
)
# Short-string letters, in the order they are printed: L5-H564-F1054-A8-Q512.
_SHORT_LETTERS = dict(zip("LHFAQ", ARCH_FIELDS))
_SHORT_RE = re.compile(r"^L(\d+)-H(\d+)-F(\d+)-A(\d+)-Q(\d+)$")

# Order of `SearchSpace.features`; the latency predictor records it with its weights.
FEATURE_NAMES = ARCH_FIELDS
MODES = ("mlm", "kd")


class ArchError(UserError):
    """An architecture that is malformed or outside a search space."""


@dataclass(frozen=True, order=True)
class Arch:
    """One homogeneous BERT architecture, named with Hugging Face's config fields.

    Frozen and hashable, so it can key caches and deduplicate search candidates.
    """

    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    qkv_size: int

    def __post_init__(self) -> None:
        for name in ARCH_FIELDS:
            value = getattr(self, name)
            # bool is an int subclass; True layers is always a mistake.
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ArchError(f"architecture field {name} must be a positive integer, got {value!r}")
        if self.qkv_size % self.num_attention_heads:
            raise ArchError(
                f"qkv_size {self.qkv_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}; every head needs the same width"
            )

    @property
    def head_size(self) -> int:
        return self.qkv_size // self.num_attention_heads

    @property
    def is_bert_compatible(self) -> bool:
        """True when stock `BertModel` can represent it (full-width attention)."""
        return self.qkv_size == self.hidden_size and self.hidden_size % self.num_attention_heads == 0

    # --- conversions -------------------------------------------------------------------
    def to_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in ARCH_FIELDS}

    @classmethod
    def from_dict(cls, data: dict) -> Arch:
        if not isinstance(data, dict):
            raise ArchError(f"an architecture must be a mapping of {', '.join(ARCH_FIELDS)}; got {type(data).__name__}")
        missing = [k for k in ARCH_FIELDS if k not in data]
        unknown = [k for k in data if k not in ARCH_FIELDS]
        if missing or unknown:
            raise ArchError(
                f"architecture fields must be exactly {', '.join(ARCH_FIELDS)}"
                + (f"; missing {', '.join(missing)}" if missing else "")
                + (f"; unknown {', '.join(map(str, unknown))}" if unknown else "")
            )
        return cls(**{k: data[k] for k in ARCH_FIELDS})

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> Arch:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ArchError(f"architecture JSON does not parse ({err.msg} at position {err.pos})") from None
        return cls.from_dict(data)

    def __str__(self) -> str:
        return "-".join(f"{letter}{getattr(self, name)}" for letter, name in _SHORT_LETTERS.items())

    @classmethod
    def parse(cls, text: str) -> Arch:
        """Parse the short form ``L5-H564-F1054-A8-Q512`` (also accepts JSON)."""
        text = text.strip()
        if text.startswith("{"):
            return cls.from_json(text)
        match = _SHORT_RE.match(text)
        if not match:
            raise ArchError(
                f"malformed architecture {text!r}: write it as L<layers>-H<hidden>-F<ffn>-A<heads>-Q<qkv>, "
                "e.g. L5-H564-F1054-A8-Q512"
            )
        try:
            return cls(*(int(group) for group in match.groups()))
        except ArchError as err:  # name the text the user wrote
            raise ArchError(f"architecture {text}: {err}") from None


@dataclass(frozen=True)
class Dim:
    """An integer range with the step that sampling and enumeration use."""

    min: int
    max: int
    step: int = 1

    def __post_init__(self) -> None:
        for name in ("min", "max", "step"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"search-space bound {name} must be a positive integer, got {value!r}")
        if self.min > self.max:
            raise UserError(f"search-space range is empty: min {self.min} > max {self.max}")

    def values(self) -> range:
        return range(self.min, self.max + 1, self.step)

    def __len__(self) -> int:
        return len(self.values())

    def __contains__(self, value: int) -> bool:
        return self.min <= value <= self.max

    def snap(self, value: int) -> int:
        """Nearest grid point to ``value`` that lies in the range."""
        steps = round((value - self.min) / self.step)
        return min(max(self.min + steps * self.step, self.min), self.values()[-1])

    def sample(self, rng: random.Random) -> int:
        return rng.choice(self.values())


@dataclass(frozen=True)
class MutationRates:
    """Per-dimension mutation probability and largest move in grid steps (DESIGN.md, paper's evolver)."""

    layers: tuple[float, int] = (0.25, 1)
    hidden: tuple[float, int] = (0.5, 1)
    ffn: tuple[float, int] = (0.5, 2)
    heads_or_qkv: tuple[float, int] = (0.25, 2)


def _dim_from(value, label: str) -> Dim:
    if isinstance(value, Dim):
        return value
    if isinstance(value, dict):
        unknown = set(value) - {"min", "max", "step"}
        if unknown or not {"min", "max"} <= set(value):
            raise UserError(f"search-space entry {label} needs keys min, max and optionally step; got {sorted(value)}")
        return Dim(value["min"], value["max"], value.get("step", 1))
    if isinstance(value, (list, tuple)) and len(value) in (2, 3):
        return Dim(*value)
    raise UserError(f"search-space entry {label} must be {{min, max, step}} or [min, max, step]; got {value!r}")


@dataclass(frozen=True)
class SearchSpace:
    """Ranges and steps of the five hyper-parameters, plus the structural rule of the mode.

    ``qkv`` is used in the kd mode only; in the mlm mode ``qkv_size = head_size * heads``.
    """

    mode: str
    layers: Dim
    hidden: Dim
    ffn: Dim
    heads: Dim
    qkv: Dim | None = None
    head_size: int | None = 64

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"unknown search-space mode {self.mode!r}: use one of {', '.join(MODES)}")
        if self.mode == "mlm":
            if not isinstance(self.head_size, int) or self.head_size < 1:
                raise UserError("an mlm search space needs a positive integer head_size (the paper uses 64)")
            if self.qkv is not None:
                raise UserError("an mlm search space derives qkv_size = head_size * heads; remove its qkv entry")
        else:
            heads = self.heads.min
            if self.heads.max != heads:
                raise UserError(
                    f"a kd search space fixes the head count (to the teacher's); got heads {self.heads.min}..{self.heads.max}"
                )
            if self.qkv is None:
                raise UserError("a kd search space needs a qkv range, e.g. {min: 180, max: 768, step: 12}")
            if self.qkv.min % heads or self.qkv.step % heads or self.qkv.max % heads:
                raise UserError(
                    f"kd qkv min, max and step must be multiples of the {heads} heads; got "
                    f"{self.qkv.min}..{self.qkv.max} step {self.qkv.step}"
                )
            object.__setattr__(self, "head_size", None)

    # --- construction ------------------------------------------------------------------
    @classmethod
    def paper(cls, mode: str = "mlm") -> SearchSpace:
        """The paper's spaces (Table 1) on the training grid (d_m, d_f step 4; d_qkv step 12)."""
        common = dict(layers=Dim(1, 8), hidden=Dim(128, 768, 4), ffn=Dim(128, 3072, 4))
        if mode == "mlm":
            return cls(mode="mlm", heads=Dim(1, 12), head_size=64, **common)
        if mode == "kd":
            return cls(mode="kd", heads=Dim(12, 12), qkv=Dim(180, 768, 12), **common)
        raise UserError(f"unknown search-space mode {mode!r}: use one of {', '.join(MODES)}")

    @classmethod
    def from_dict(cls, data: dict) -> SearchSpace:
        if not isinstance(data, dict):
            raise UserError(f"a search space must be a mapping; got {type(data).__name__}")
        known = {"mode", "layers", "hidden", "ffn", "heads", "qkv", "head_size"}
        unknown = set(data) - known
        if unknown:
            raise UserError(f"unknown search-space keys {sorted(unknown)}; allowed: {sorted(known)}")
        for key in ("mode", "layers", "hidden", "ffn", "heads"):
            if key not in data:
                raise UserError(f"search space is missing {key!r}")
        return cls(
            mode=data["mode"],
            layers=_dim_from(data["layers"], "layers"),
            hidden=_dim_from(data["hidden"], "hidden"),
            ffn=_dim_from(data["ffn"], "ffn"),
            heads=_dim_from(data["heads"], "heads"),
            qkv=_dim_from(data["qkv"], "qkv") if data.get("qkv") is not None else None,
            head_size=data.get("head_size", 64 if data["mode"] == "mlm" else None),
        )

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        return {k: v for k, v in data.items() if v is not None}

    @classmethod
    def from_file(cls, path: str | Path) -> SearchSpace:
        """Load a space from YAML (``.yaml``/``.yml``) or JSON."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"cannot read search-space file {path}: {err}") from None
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as err:  # yaml and json raise different types; both mean "malformed"
            raise UserError(f"search-space file {path} does not parse: {str(err).splitlines()[0]}") from None
        try:
            return cls.from_dict(data)
        except UserError as err:
            raise UserError(f"{path}: {err}") from None

    @classmethod
    def load(cls, spec: str | Path) -> SearchSpace:
        """``paper-mlm``, ``paper-kd``, ``mlm``, ``kd``, a YAML/JSON file, or a SuperPLM checkpoint
        directory (its space: e.g. one made by ``init --from`` a pre-trained model)."""
        name = str(spec)
        if name in MODES:
            return cls.paper(name)
        if name.startswith("paper-") and name[len("paper-"):] in MODES:
            return cls.paper(name[len("paper-"):])
        if Path(name).is_dir():
            return cls.of_checkpoint(Path(name), "search space")
        if not Path(name).exists():
            raise UserError(f"search space {name!r} is neither paper-mlm, paper-kd, an existing YAML/JSON file nor a "
                            "SuperPLM directory")
        return cls.from_file(name)

    @classmethod
    def of_checkpoint(cls, directory: str | Path, option: str) -> SearchSpace:
        """The space of a SuperPLM checkpoint directory, from its config.json alone (no torch, no
        weights); ``option`` names where the directory came from in the error."""
        config = Path(directory) / "config.json"
        try:
            return cls.from_dict(json.loads(config.read_text(encoding="utf-8"))["space"])
        except FileNotFoundError:
            raise UserError(f"{option} {directory} is not a SuperPLM checkpoint directory (no config.json)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise UserError(f"{config} is not a SuperPLM config ({type(err).__name__}: {err})") from None

    def with_limits(self, *, layers: int | None = None, hidden: int | None = None, ffn: int | None = None,
                    heads: int | None = None, qkv: int | None = None) -> SearchSpace:
        """A copy with smaller maxima (for machines that cannot train the full SuperPLM)."""

        def cap(dim: Dim | None, limit: int | None, label: str) -> Dim | None:
            if dim is None or limit is None:
                return dim
            if limit < dim.min:
                raise UserError(f"--max-{label} {limit} is below the space's minimum {dim.min}")
            top = min(limit, dim.max)
            return Dim(dim.min, dim.min + (top - dim.min) // dim.step * dim.step, dim.step)

        if heads is not None and self.mode == "kd":
            raise UserError("a kd space fixes the head count; shrink qkv instead")
        if qkv is not None and self.mode == "mlm":
            raise UserError("an mlm space derives qkv from heads; shrink heads instead")
        return dataclasses.replace(
            self,
            layers=cap(self.layers, layers, "layers"),
            hidden=cap(self.hidden, hidden, "hidden"),
            ffn=cap(self.ffn, ffn, "ffn"),
            heads=cap(self.heads, heads, "heads"),
            qkv=cap(self.qkv, qkv, "qkv"),
        )

    # --- membership --------------------------------------------------------------------
    def _qkv_for(self, heads: int) -> int:
        assert self.head_size is not None
        return self.head_size * heads

    def why_not(self, arch: Arch) -> str | None:
        """None if ``arch`` is in the space, else the first reason it is not."""
        checks = (
            ("num_hidden_layers", self.layers),
            ("hidden_size", self.hidden),
            ("intermediate_size", self.ffn),
            ("num_attention_heads", self.heads),
        )
        for name, dim in checks:
            value = getattr(arch, name)
            if value not in dim:
                return f"{name} {value} is outside {dim.min}..{dim.max}"
        if self.mode == "mlm":
            if arch.qkv_size != self._qkv_for(arch.num_attention_heads):
                return (f"qkv_size {arch.qkv_size} must equal {self.head_size} * num_attention_heads "
                        f"= {self._qkv_for(arch.num_attention_heads)} in the mlm space")
        else:
            if arch.qkv_size not in self.qkv:
                return f"qkv_size {arch.qkv_size} is outside {self.qkv.min}..{self.qkv.max}"
        return None

    def contains(self, arch: Arch) -> bool:
        return self.why_not(arch) is None

    def __contains__(self, arch: Arch) -> bool:
        return self.contains(arch)

    def check(self, arch: Arch) -> Arch:
        """Return ``arch`` or raise an `ArchError` saying why it is outside the space."""
        reason = self.why_not(arch)
        if reason:
            raise ArchError(f"architecture {arch} is not in the {self.mode} search space: {reason}")
        return arch

    # --- points ------------------------------------------------------------------------
    def _make(self, layers: int, hidden: int, ffn: int, heads: int, qkv: int | None = None) -> Arch:
        if self.mode == "mlm":
            qkv = self._qkv_for(heads)
        return Arch(layers, hidden, ffn, heads, qkv)

    def largest(self) -> Arch:
        return self._make(self.layers.max, self.hidden.max, self.ffn.max, self.heads.max,
                          self.qkv.max if self.qkv else None)

    def smallest(self) -> Arch:
        return self._make(self.layers.min, self.hidden.min, self.ffn.min, self.heads.min,
                          self.qkv.min if self.qkv else None)

    @property
    def max_head_size(self) -> int:
        """Width of one head in the SuperPLM (heads are sliced inside this width in kd mode)."""
        return self.head_size if self.mode == "mlm" else self.qkv.max // self.heads.max

    def sample(self, rng: random.Random) -> Arch:
        """A uniform draw from the grid; ``rng`` is the only source of randomness."""
        return self._make(
            self.layers.sample(rng), self.hidden.sample(rng), self.ffn.sample(rng), self.heads.sample(rng),
            self.qkv.sample(rng) if self.qkv else None,
        )

    def _searched_dims(self) -> list[Dim]:
        return [self.layers, self.hidden, self.ffn, self.qkv if self.mode == "kd" else self.heads]

    def grid(self) -> Iterator[Arch]:
        """Every grid point, lazily (the paper spaces hold millions)."""
        layers, hidden, ffn, last = (d.values() for d in self._searched_dims())
        for n_layers, d_model, d_ffn, x in itertools.product(layers, hidden, ffn, last):
            if self.mode == "mlm":
                yield self._make(n_layers, d_model, d_ffn, x)
            else:
                yield self._make(n_layers, d_model, d_ffn, self.heads.min, x)

    def size(self) -> int:
        return math.prod(len(d) for d in self._searched_dims())

    def mutate(self, arch: Arch, rng: random.Random, rates: MutationRates = MutationRates()) -> Arch:
        """One mutation step of the paper's evolver.

        Each dimension moves with its probability by a non-zero number of grid steps, at most
        the rate's bound (layers ±1, hidden ±1, FFN ±2, heads or qkv ±2), then is snapped back
        onto the grid inside the range. The result may equal ``arch``; callers that need a new
        architecture draw again (boundedly).
        """

        def move(value: int, dim: Dim, rate: tuple[float, int]) -> int:
            probability, max_steps = rate
            if rng.random() >= probability:
                return value
            steps = rng.choice([s for s in range(-max_steps, max_steps + 1) if s != 0])
            return dim.snap(value + steps * dim.step)

        layers = move(arch.num_hidden_layers, self.layers, rates.layers)
        hidden = move(arch.hidden_size, self.hidden, rates.hidden)
        ffn = move(arch.intermediate_size, self.ffn, rates.ffn)
        if self.mode == "mlm":
            heads = move(arch.num_attention_heads, self.heads, rates.heads_or_qkv)
            return self._make(layers, hidden, ffn, heads)
        qkv = move(arch.qkv_size, self.qkv, rates.heads_or_qkv)
        return self._make(layers, hidden, ffn, self.heads.min, qkv)

    @staticmethod
    def features(arch: Arch) -> tuple[float, ...]:
        """Raw numeric features in `FEATURE_NAMES` order (predictors normalise them)."""
        return tuple(float(getattr(arch, name)) for name in FEATURE_NAMES)

    def describe(self) -> str:
        def fmt(dim: Dim) -> str:
            return f"{dim.min}..{dim.max} step {dim.step}"

        lines = [
            f"mode                 {self.mode}",
            f"num_hidden_layers    {fmt(self.layers)}",
            f"hidden_size          {fmt(self.hidden)}",
            f"intermediate_size    {fmt(self.ffn)}",
            f"num_attention_heads  {fmt(self.heads)}",
        ]
        if self.mode == "mlm":
            lines.append(f"qkv_size             {self.head_size} * num_attention_heads")
        else:
            lines.append(f"qkv_size             {fmt(self.qkv)} ({self.max_head_size} max per head)")
        lines.append(f"grid size            {self.size():,}")
        return "\n".join(lines)


@dataclass(frozen=True)
class Released:
    """An architecture released with the paper, with its reported speedup over BERT-base."""

    name: str
    mode: str
    arch: Arch
    speedup: float


RELEASED: tuple[Released, ...] = (
    Released("S1", "mlm", Arch(5, 564, 1054, 8, 512), 7.2),
    Released("S2", "mlm", Arch(4, 396, 624, 6, 384), 15.7),
    Released("S3", "mlm", Arch(4, 432, 384, 4, 256), 20.2),
    Released("S4", "mlm", Arch(3, 320, 608, 4, 256), 27.2),
    Released("KD-S1", "kd", Arch(5, 564, 1024, 12, 528), 4.6),
    Released("KD-S2", "kd", Arch(5, 324, 600, 12, 324), 9.0),
    Released("KD-S3", "kd", Arch(5, 280, 512, 12, 276), 10.7),
    Released("KD-S4", "kd", Arch(4, 256, 480, 12, 192), 17.0),
)

BERT_BASE = Arch(12, 768, 3072, 12, 768)


def released(mode: str | None = None) -> list[Released]:
    return [r for r in RELEASED if mode is None or r.mode == mode]


def parameter_count(arch: Arch, vocab_size: int = 30522, max_position_embeddings: int = 512,
                    type_vocab_size: int = 2, mlm_head: bool = False, pooler: bool = False) -> int:
    """Parameters of the exported encoder (the MLM decoder weight is tied, so only its bias counts)."""
    d, f, q = arch.hidden_size, arch.intermediate_size, arch.qkv_size
    embeddings = (vocab_size + max_position_embeddings + type_vocab_size) * d + 2 * d
    attention = 3 * (d * q + q) + (q * d + d) + 2 * d
    feed_forward = (d * f + f) + (f * d + d) + 2 * d
    total = embeddings + arch.num_hidden_layers * (attention + feed_forward)
    if pooler:
        total += d * d + d
    if mlm_head:
        total += (d * d + d) + 2 * d + vocab_size
    return total


# --- depth order: which layers of the SuperPLM a shallower sub-model keeps ------------------------
DEPTH_ORDERS = ("first", "spaced", "importance")


def spaced_layers(total: int, depth: int) -> tuple[int, ...]:
    """``depth`` evenly spaced layers of ``total``, the last one always kept (DynaBERT's depth
    reduction, MiniLM-L3 from L6): 3 of 6 -> (1, 3, 5); 2 of 6 -> (2, 5)."""
    return tuple((i + 1) * total // depth - 1 for i in range(depth))


def ranked_layers(scores: list[float], depth: int) -> tuple[int, ...]:
    """The ``depth`` highest-scoring layers, in network order (ties keep the earlier layer)."""
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return tuple(sorted(ranked[:depth]))


def depth_layers(order: str, total: int, depths: range, scores: list[float] | None = None) -> dict[str, list[int]]:
    """The fixed rule per depth: ``{"L": [kept layer indices]}`` for each depth in ``depths``.

    ``first`` (the paper) keeps layers 0..L-1; ``spaced`` keeps evenly spaced ones ending with the
    last; ``importance`` keeps the L layers with the highest ``scores`` (one score per layer, e.g.
    how much the task loss grows when that layer alone is skipped). Layer i is one shared tensor in
    every sub-model that keeps it.
    """
    if order not in DEPTH_ORDERS:
        raise UserError(f"unknown depth order {order!r}; use one of {', '.join(DEPTH_ORDERS)}")
    if order == "importance" and (scores is None or len(scores) != total):
        raise ValueError(f"the importance depth order needs one score per layer ({total})")
    rule = {"first": lambda depth: tuple(range(depth)), "spaced": lambda depth: spaced_layers(total, depth),
            "importance": lambda depth: ranked_layers(scores, depth)}[order]
    return {str(depth): list(rule(depth)) for depth in depths}


def check_depth_layers(layers: dict[str, list[int]], total: int, depths: range) -> None:
    """Every depth of the space has a list of that many increasing layer indices below ``total``."""
    for depth in depths:
        kept = layers.get(str(depth))
        if kept is None or len(kept) != depth or list(kept) != sorted(set(kept)) or not all(0 <= i < total for i in kept):
            raise UserError(f"depth_layers[{depth}] = {kept!r} is not {depth} increasing layer indices below {total}")
