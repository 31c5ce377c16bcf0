"""Fitness functions for the search: the only part of it that touches models.

``proxy``: the architecture keeps the weights it inherits from the SuperPLM (no training) and
is scored on fixed masked held-out batches — validation MLM accuracy, −MLM loss, or −KD loss
against a teacher. The paper's fitness is fine-tuned MNLI/SQuAD; that evaluator needs the
downstream fine-tuning stage (`autotinybert.tasks`).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from .errors import UserError
from .space import Arch

METRICS = ("mlm_accuracy", "mlm_loss", "kd_loss")


def file_digest(path: Path, limit: int = 1 << 30) -> str:
    """sha256 of a weights file: the evaluator key must change when the SuperPLM does."""
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            h.update(chunk)
            limit -= len(chunk)
            if limit <= 0:
                break
    return h.hexdigest()[:16]


def _seq_len_of(supernet: Path) -> int | None:
    """The sequence length the SuperPLM was pre-trained with, from its config.yaml if any."""
    config = supernet / "config.yaml"
    if not config.is_file():
        return None
    import yaml

    try:
        value = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("seq_len")
    except yaml.YAMLError:
        return None
    return int(value) if isinstance(value, int) else None


class ProxyEvaluator:
    """Fitness = a validation metric of the inherited sub-model on fixed held-out batches."""

    def __init__(self, supernet: str | Path, valid_corpus: list[str], *, metric: str = "mlm_accuracy",
                 teacher: str | None = None, seq_len: int | None = None, batch_size: int = 32, batches: int = 8,
                 seed: int = 0, cache_dir: str | Path | None = None, device: str = "cpu") -> None:
        import torch

        from .data import build_dataset
        from .modeling import load_supernet, load_tokenizer
        from .pretrain import Teacher

        if metric not in METRICS:
            raise UserError(f"unknown proxy metric {metric!r}: use one of {', '.join(METRICS)}")
        if metric == "kd_loss" and not teacher:
            raise UserError("--metric kd_loss needs --teacher (the checkpoint the SuperPLM was distilled from)")
        if not valid_corpus:
            raise UserError("the proxy evaluator needs --valid-corpus (held-out text the SuperPLM did not train on)")
        if batch_size < 1 or batches < 1:
            raise UserError("--eval-batch-size and --eval-batches must be positive")
        supernet = Path(supernet)
        self.model = load_supernet(supernet)
        self.space = self.model.config.search_space
        self.tokenizer = load_tokenizer(supernet)
        self.device = torch.device(device)
        self.model.to(self.device)
        self.seq_len = seq_len or _seq_len_of(supernet) or 128
        cache = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "autotinybert" / "data"
        # The held-out text is both "corpus" and validation here: only the valid split is used.
        _, self.valid, _ = build_dataset(valid_corpus, self.tokenizer, self.seq_len, cache, valid_corpus)
        if len(self.valid) == 0:
            raise UserError(f"--valid-corpus {' '.join(valid_corpus)} holds no text")
        self.teacher = Teacher(teacher, self.device) if teacher else None
        if self.teacher is not None:
            self.teacher.check_fits(self.space, len(self.tokenizer))
        self.metric, self.batch_size, self.batches, self.seed = metric, batch_size, batches, seed
        self.key = (f"proxy:{metric}:supernet={file_digest(supernet / 'model.safetensors')}:seq={self.seq_len}"
                    f":bs={batch_size}:batches={batches}:seed={seed}:valid={len(self.valid)}"
                    + (f":teacher={Path(teacher).resolve()}" if teacher else ""))
        self.seconds: list[float] = []

    def __call__(self, arch: Arch) -> float:
        import torch

        from .pretrain import evaluate

        self.space.check(arch)
        start = time.perf_counter()
        with torch.no_grad():
            row = evaluate(self.model, self.valid, self.tokenizer, [arch], "kd" if self.teacher else "mlm",
                           self.teacher, self.batch_size, self.batches, self.seed, self.device)[str(arch)]
        self.seconds.append(time.perf_counter() - start)
        # Higher is better for the search: losses are negated.
        return row["mlm_accuracy"] if self.metric == "mlm_accuracy" else -row[self.metric]


def finetune_evaluator(*_args, **_kwargs):
    try:
        import autotinybert.tasks  # noqa: F401  (issue 5: downstream fine-tuning)
    except ImportError:
        raise UserError("--evaluator finetune needs the downstream fine-tuning stage, not built yet; "
                        "use --evaluator proxy") from None
    raise UserError("--evaluator finetune is not wired to autotinybert.tasks yet; use --evaluator proxy")
