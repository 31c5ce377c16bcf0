"""The run's tokenizer: the one given (``--tokenizer``), ``--init``'s, or a WordPiece vocabulary
trained on the corpus (``--vocab-size``), cached by (corpus, size); saved into ``out`` for resume.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from ..checkpoint import load_tokenizer
from ..data import corpus_files, corpus_fingerprint, train_wordpiece
from ..errors import UserError
from ..files import fsync_path, staged_directory
from ..settings import PretrainSettings
from ..training import Workers


def prepare_tokenizer(settings: PretrainSettings, out: Path, workers: Workers, resume: bool, cache_dir: Path):
    if resume and (out / "tokenizer_config.json").is_file():
        return load_tokenizer(out)
    if settings.tokenizer:
        tokenizer = load_tokenizer(settings.tokenizer)
        if settings.vocab_size is not None and settings.vocab_size != len(tokenizer):
            raise UserError(f"--vocab-size {settings.vocab_size} contradicts the tokenizer's {len(tokenizer)} tokens")
        return tokenizer
    if settings.init and any((Path(settings.init) / f).is_file() for f in ("tokenizer.json", "vocab.txt")):
        return load_tokenizer(settings.init, "--init")
    if settings.vocab_size is None:
        raise UserError("give --tokenizer DIR (e.g. the teacher's) or --vocab-size N to train a WordPiece vocabulary")
    # The tokenizers library breaks frequency ties in hash order, so two trainings on the same text
    # can differ. Caching the vocabulary by (corpus, size) makes reruns see the very same one.
    files = corpus_files([c for c in settings.corpus if not c.startswith("hf:")])
    key = hashlib.sha256(f"{corpus_fingerprint(files)}:{settings.vocab_size}".encode()).hexdigest()[:20]
    target = cache_dir / "tokenizers" / key
    if workers.main and not (target / "tokenizer_config.json").is_file():
        with staged_directory(target, overwrite=True) as tmp:
            train_wordpiece(files, settings.vocab_size, tmp)
    workers.barrier()
    return load_tokenizer(target)


def save_tokenizer(tokenizer, out: Path) -> None:
    """Tokenizer files into ``out``, each moved in whole, tokenizer_config.json (the marker read on
    resume) last: a kill never leaves a marker without the vocabulary."""
    if (out / "tokenizer_config.json").is_file():
        return
    staging = out / ".tokenizer.partial"
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer.save_pretrained(str(staging))
    for name in sorted(os.listdir(staging), key=lambda n: n == "tokenizer_config.json"):
        fsync_path(staging / name)
        os.replace(staging / name, out / name)
    fsync_path(out)
    shutil.rmtree(staging, ignore_errors=True)
