"""Pre-training data: corpus -> tokenizer -> packed sequences (cached on disk) -> masked batches.

* A corpus is text files in the classic BERT format (one sentence per line, a blank line
  between documents; plain paragraphs work too) or, online, a Hugging Face dataset
  (``hf:NAME[:CONFIG]`` with a text column).
* Sentences of one document are packed greedily into ``[CLS] ... [SEP]`` sequences of at most
  ``seq_len`` tokens; a sequence never crosses a document boundary.
* The packed arrays are cached as ``.npy`` files (memory-mapped, no pickle) under a key made of
  the corpus content, the tokenizer vocabulary and ``seq_len``, and reused by later runs.
* Masking is dynamic (re-drawn every time a batch is built) and BERT's: 15% of non-special
  tokens, of which 80% become [MASK], 10% a random token, 10% stay.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from .errors import UserError
from .files import atomic_write_json, staged_directory

CACHE_FORMAT = 1
IGNORE_INDEX = -100


# --- corpus ---------------------------------------------------------------------------------
def corpus_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand files and directories (their ``*.txt``, not recursive) into a sorted file list."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.glob("*.txt") if p.is_file())
            if not found:
                raise UserError(f"corpus directory {path} has no .txt files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"corpus {path} does not exist; pass text files or directories of .txt files")
    if not files:
        raise UserError("no corpus given: pass --corpus FILE_OR_DIR")
    return files


def read_documents(path: Path) -> Iterator[list[str]]:
    """Documents of one file, each a list of non-empty lines. Binary or non-UTF-8 input is an error."""
    data = path.read_bytes()
    if b"\x00" in data[:1_000_000]:
        raise UserError(f"{path} looks binary (NUL bytes); the corpus must be UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 (byte {err.start}); re-encode the file as UTF-8") from None
    document: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if line:
            document.append(line)
        elif document:
            yield document
            document = []
    if document:
        yield document


def hf_documents(spec: str, text_column: str = "text", split: str = "train") -> Iterator[list[str]]:
    """Documents of a Hugging Face dataset ``hf:NAME[:CONFIG]`` (needs internet and `datasets`)."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise UserError("hf: corpora need the hub extra: pip install 'autotinybert[hub]'") from None
    name, _, config = spec[len("hf:"):].partition(":")
    dataset = load_dataset(name, config or None, split=split)
    if text_column not in dataset.column_names:
        raise UserError(f"dataset {name} has no column {text_column!r}; choose --text-column from {dataset.column_names}")
    for row in dataset:
        lines = [line.strip() for line in str(row[text_column]).splitlines() if line.strip()]
        if lines:
            yield lines


def corpus_fingerprint(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


# --- tokenizer ------------------------------------------------------------------------------
def train_wordpiece(files: list[Path], vocab_size: int, out_dir: Path):
    """Train a lowercase WordPiece vocabulary on the corpus and return a `BertTokenizerFast`."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    if vocab_size < 100:
        raise UserError(f"--vocab-size {vocab_size} is too small; use at least 100 (e.g. 8000 for CPU runs)")
    trainer = BertWordPieceTokenizer(lowercase=True)
    trainer.train([str(f) for f in files], vocab_size=vocab_size, min_frequency=2, show_progress=False,
                  special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer.save_model(str(out_dir))
    tokenizer = BertTokenizerFast.from_pretrained(str(out_dir), do_lower_case=True)
    if len(tokenizer) != trainer.get_vocab_size():
        raise RuntimeError(f"WordPiece vocabulary of {trainer.get_vocab_size()} tokens loaded as {len(tokenizer)}")
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps([type(tokenizer).__name__, vocab]).encode()).hexdigest()


# --- packing --------------------------------------------------------------------------------
def pack_document(sentences: list[list[int]], seq_len: int, cls_id: int, sep_id: int) -> Iterator[list[int]]:
    """Greedy packing of one document's sentences into ``[CLS] ... [SEP]`` of <= ``seq_len`` tokens.

    A sentence longer than the room is split; a sequence never mixes documents.
    """
    room = seq_len - 2
    current: list[int] = []
    for ids in sentences:
        while ids:
            if len(current) == room:
                yield [cls_id, *current, sep_id]
                current = []
            take = room - len(current)
            current.extend(ids[:take])
            ids = ids[take:]
    if current:
        yield [cls_id, *current, sep_id]


def pack_documents(documents: Iterable[list[str]], tokenizer, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, seq_len) int32 ids padded with the pad id, and (N,) lengths."""
    if seq_len < 8:
        raise UserError(f"--seq-len {seq_len} is too short; use at least 8 (128 is the paper's)")
    rows: list[list[int]] = []
    for document in documents:
        encoded = tokenizer(document, add_special_tokens=False)["input_ids"]
        rows.extend(pack_document(encoded, seq_len, tokenizer.cls_token_id, tokenizer.sep_token_id))
    ids = np.full((len(rows), seq_len), tokenizer.pad_token_id, dtype=np.int32)
    lengths = np.zeros(len(rows), dtype=np.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        lengths[i] = len(row)
    return ids, lengths


@dataclass
class PackedSplit:
    ids: np.ndarray       # (N, T) int32, memory-mapped when read from the cache
    lengths: np.ndarray   # (N,) int32

    def __len__(self) -> int:
        return len(self.lengths)


def split_documents(documents: list[list[str]], valid_fraction: float) -> tuple[list, list]:
    """Deterministic held-out documents: every k-th document, so all sources are represented."""
    if valid_fraction <= 0 or len(documents) < 2:
        return documents, []
    every = max(2, round(1 / valid_fraction))
    train = [d for i, d in enumerate(documents) if i % every != every - 1]
    valid = [d for i, d in enumerate(documents) if i % every == every - 1]
    return train, valid


def build_dataset(corpus: list[str | Path], tokenizer, seq_len: int, cache_dir: Path,
                  valid_corpus: list[str | Path] | None = None, valid_fraction: float = 0.02,
                  text_column: str = "text") -> tuple[PackedSplit, PackedSplit, Path]:
    """Packed train/validation splits, from the cache when the same inputs were seen before."""
    hub = [str(c) for c in corpus if str(c).startswith("hf:")]
    files = corpus_files([c for c in corpus if not str(c).startswith("hf:")]) if len(hub) < len(corpus) else []
    valid_files = corpus_files(valid_corpus) if valid_corpus else []
    key_source = {
        "format": CACHE_FORMAT,
        "corpus": corpus_fingerprint(files) if files else None,
        "hub": hub,
        "valid": corpus_fingerprint(valid_files) if valid_files else None,
        "valid_fraction": None if valid_files else valid_fraction,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "seq_len": seq_len,
    }
    key = hashlib.sha256(json.dumps(key_source, sort_keys=True).encode()).hexdigest()[:20]
    entry = Path(cache_dir) / key
    if not (entry / "meta.json").is_file():
        _write_cache(entry, files, hub, valid_files, tokenizer, seq_len, valid_fraction, text_column, key_source)
    return _load_split(entry, "train"), _load_split(entry, "valid"), entry


def _write_cache(entry: Path, files, hub, valid_files, tokenizer, seq_len, valid_fraction, text_column,
                 key_source) -> None:
    documents = [doc for path in files for doc in read_documents(path)]
    for spec in hub:
        documents.extend(hf_documents(spec, text_column))
    if not documents:
        raise UserError(f"the corpus ({', '.join(map(str, files or hub))}) contains no text")
    if valid_files:
        train_docs, valid_docs = documents, [doc for path in valid_files for doc in read_documents(path)]
    else:
        train_docs, valid_docs = split_documents(documents, valid_fraction)
    train = pack_documents(train_docs, tokenizer, seq_len)
    valid = pack_documents(valid_docs, tokenizer, seq_len)
    with staged_directory(entry, overwrite=True) as tmp:
        for name, (ids, lengths) in (("train", train), ("valid", valid)):
            np.save(tmp / f"{name}_ids.npy", ids, allow_pickle=False)
            np.save(tmp / f"{name}_lengths.npy", lengths, allow_pickle=False)
        atomic_write_json(tmp / "meta.json", {
            **key_source, "train_sequences": len(train[1]), "valid_sequences": len(valid[1]),
            "train_tokens": int(train[1].sum()), "files": [str(f) for f in files],
        })


def _load_split(entry: Path, name: str) -> PackedSplit:
    return PackedSplit(np.load(entry / f"{name}_ids.npy", mmap_mode="r", allow_pickle=False),
                       np.load(entry / f"{name}_lengths.npy", allow_pickle=False))


# --- batches and masking ----------------------------------------------------------------------
def make_batch(split: PackedSplit, indices: np.ndarray | list[int]) -> dict[str, torch.Tensor]:
    """Rows trimmed to the longest sequence in the batch (saves compute on short documents)."""
    lengths = split.lengths[indices]
    width = int(lengths.max())
    ids = torch.from_numpy(np.ascontiguousarray(split.ids[indices, :width])).long()
    attention_mask = (torch.arange(width)[None, :] < torch.from_numpy(lengths)[:, None].long()).long()
    return {"input_ids": ids, "attention_mask": attention_mask}


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: list[int], mask_id: int,
                vocab_size: int, generator: torch.Generator, probability: float = 0.15
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: returns (masked input ids, labels with -100 at unmasked positions)."""
    maskable = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(special_ids))
    chosen = (torch.rand(input_ids.shape, generator=generator) < probability) & maskable
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    roll = torch.rand(input_ids.shape, generator=generator)
    random_tokens = torch.randint(0, vocab_size, input_ids.shape, generator=generator)
    masked = input_ids.clone()
    masked[chosen & (roll < 0.8)] = mask_id                                       # 80% [MASK]
    replace = chosen & (roll >= 0.8) & (roll < 0.9)                               # 10% random
    masked[replace] = random_tokens[replace]
    return masked, labels                                                         # 10% unchanged
