"""GLUE tasks: definitions and loading, from the classic local layout or the Hugging Face hub.

Both sources give the same in-memory representation: a `GlueSplit` of `GlueExample`s whose
label is the label *name* (classification, in the hub's ClassLabel order) or a float (STS-B),
and None for unlabeled test rows.

Local layout: the one `download_glue_data.py` writes, `glue_data/<TASK>/{train,dev,test}.tsv`
(MNLI: `dev_matched.tsv`, `dev_mismatched.tsv`, `test_matched.tsv`, `test_mismatched.tsv`).
Quirks handled: CoLA train/dev have no header row (CoLA test has one); MRPC's header starts
with a UTF-8 byte-order mark; fields are never quoted (csv.QUOTE_NONE: a lone `"` is text).
Malformed rows raise `UserError` naming the file and line.
"""

from __future__ import annotations

import csv
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from ..errors import UserError, reading

# Long STS-B / QNLI fields exceed the csv module's default 128 KiB field limit in some copies.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


@dataclass(frozen=True)
class GlueExample:
    guid: str                        # where it came from: "dev.tsv:17" or "hub:validation:16"
    text_a: str
    text_b: str | None
    label: str | float | None        # label name, STS-B score, or None (test)
    index: str | None = None         # the test file's id column, for submission files


@dataclass(frozen=True)
class GlueSplit:
    task: str
    split: str                       # "train", "dev", "dev_matched", "test_mismatched", ...
    examples: tuple[GlueExample, ...]
    source: str                      # file path or "hub:<dataset>/<config>:<split>"


@dataclass(frozen=True)
class Columns:
    """Where a task's fields live in its TSV: header names, or indices for header-less files."""

    text_a: str | int
    text_b: str | int | None
    label: str | int | None
    index: str | int | None = None
    header: bool = True


@dataclass(frozen=True)
class GlueTask:
    name: str                                  # canonical lower-case name, e.g. "sst2"
    directory: str                             # classic directory name, e.g. "SST-2"
    labels: tuple[str, ...] | None             # label names in hub order; None = regression
    train_columns: Columns
    test_columns: Columns
    dev_files: dict[str, str]                  # split name -> file
    test_files: dict[str, str]                 # split name -> file
    submission: dict[str, str]                 # test split -> GLUE submission file stem
    hub_fields: tuple[str, str | None]         # text fields in the hub records
    hub_splits: dict[str, str]                 # our split name -> hub split name
    tsv_labels: dict[str, str] | None = None   # TSV spelling -> label name, when they differ

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def default_max_seq_length(self) -> int:
        """The sequence length when --max-seq-length is not given (BERT's GLUE recipe)."""
        return 128

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def main_dev_split(self) -> str:
        """The dev split model selection uses (MNLI: matched)."""
        return next(iter(self.dev_files))


_DEV = {"dev": "dev.tsv"}
_TEST = {"test": "test.tsv"}
_HUB = {"train": "train", "dev": "validation", "test": "test"}
_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")


def _task(name, directory, labels, train_columns, test_columns, hub_fields, submission, **extra) -> GlueTask:
    return GlueTask(
        name=name, directory=directory, labels=labels, train_columns=train_columns,
        test_columns=test_columns, dev_files=extra.pop("dev_files", _DEV), test_files=extra.pop("test_files", _TEST),
        submission=submission if isinstance(submission, dict) else {"test": submission},
        hub_fields=hub_fields, hub_splits=extra.pop("hub_splits", _HUB), **extra,
    )


GLUE_TASKS: dict[str, GlueTask] = {t.name: t for t in (
    # CoLA train/dev: source, label, original mark, sentence; no header row.
    _task("cola", "CoLA", _BINARY, Columns(3, None, 1, header=False), Columns("sentence", None, None, "index"),
          ("sentence", None), "CoLA"),
    _task("sst2", "SST-2", _BINARY, Columns("sentence", None, "label"), Columns("sentence", None, None, "index"),
          ("sentence", None), "SST-2"),
    _task("mrpc", "MRPC", _BINARY, Columns("#1 String", "#2 String", "Quality"),
          Columns("#1 String", "#2 String", None, "index"), ("sentence1", "sentence2"), "MRPC"),
    _task("stsb", "STS-B", None, Columns("sentence1", "sentence2", "score"),
          Columns("sentence1", "sentence2", None, "index"), ("sentence1", "sentence2"), "STS-B"),
    _task("qqp", "QQP", _BINARY, Columns("question1", "question2", "is_duplicate"),
          Columns("question1", "question2", None, "id"), ("question1", "question2"), "QQP"),
    _task("mnli", "MNLI", ("entailment", "neutral", "contradiction"),
          Columns("sentence1", "sentence2", "gold_label"), Columns("sentence1", "sentence2", None, "index"),
          ("premise", "hypothesis"), {"test_matched": "MNLI-m", "test_mismatched": "MNLI-mm"},
          dev_files={"dev_matched": "dev_matched.tsv", "dev_mismatched": "dev_mismatched.tsv"},
          test_files={"test_matched": "test_matched.tsv", "test_mismatched": "test_mismatched.tsv"},
          hub_splits={"train": "train", "dev_matched": "validation_matched",
                      "dev_mismatched": "validation_mismatched", "test_matched": "test_matched",
                      "test_mismatched": "test_mismatched"}),
    _task("qnli", "QNLI", _NLI2, Columns("question", "sentence", "label"),
          Columns("question", "sentence", None, "index"), ("question", "sentence"), "QNLI"),
    _task("rte", "RTE", _NLI2, Columns("sentence1", "sentence2", "label"),
          Columns("sentence1", "sentence2", None, "index"), ("sentence1", "sentence2"), "RTE"),
    _task("wnli", "WNLI", _BINARY, Columns("sentence1", "sentence2", "label"),
          Columns("sentence1", "sentence2", None, "index"), ("sentence1", "sentence2"), "WNLI"),
)}

# The GLUE diagnostic set (AX) is predicted with the MNLI model and submitted as AX.tsv.
DIAGNOSTIC = ("diagnostic", "diagnostic.tsv", "AX")

_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "mnli_matched": "mnli"}


def glue_task(name: str) -> GlueTask:
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in GLUE_TASKS:
        raise UserError(f"unknown GLUE task {name!r}; choose one of {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[key]


# --- local files ---------------------------------------------------------------------------

def task_directory(task: GlueTask, data_dir: str | Path) -> Path:
    """`data_dir/<TASK>` or `data_dir/glue/<TASK>`, so both glue_data/ and its parent work."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir} is not a directory; point it at your glue_data folder")
    for candidate in (data_dir / task.directory, data_dir / "glue" / task.directory, data_dir / "glue_data" / task.directory):
        if candidate.is_dir():
            return candidate
    if data_dir.name == task.directory:
        return data_dir
    raise UserError(f"no {task.directory}/ folder in {data_dir} (nor in {data_dir}/glue); "
                    f"point --data-dir at the folder that holds {task.directory}/train.tsv")


def load_local_split(task: GlueTask, data_dir: str | Path, split: str) -> GlueSplit:
    """Read one split ("train", a dev split or a test split) of `task` from the classic layout."""
    directory = task_directory(task, data_dir)
    file_name = {"train": "train.tsv", **task.dev_files, **task.test_files}.get(split)
    if file_name is None:
        raise UserError(f"{task.name} has no split {split!r}; it has train, {', '.join([*task.dev_files, *task.test_files])}")
    path = directory / file_name
    if not path.is_file():
        raise UserError(f"missing file {path}; {task.name} expects {task.directory}/{file_name} "
                        f"(classic download_glue_data.py layout)")
    columns = task.test_columns if split in task.test_files else task.train_columns
    examples = tuple(_read_tsv(task, path, columns))
    if not examples:
        raise UserError(f"{path} has no data rows")
    return GlueSplit(task.name, split, examples, str(path))


def _read_tsv(task: GlueTask, path: Path, columns: Columns) -> Iterable[GlueExample]:
    fix = f"give the GLUE {task.name} TSV file (UTF-8 text, tab-separated)"
    with reading(path, fix=fix, also=(csv.Error,)), open(path, encoding="utf-8-sig", newline="") as handle:  # BOM: MRPC
        rows = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        position = _column_positions(path, columns, next(rows, None)) if columns.header else columns
        width = max(p for p in (position.text_a, position.text_b, position.label, position.index) if p is not None)
        for row in rows:
            where = f"{path}:{rows.line_num}"
            if not row:
                continue  # a trailing blank line
            if len(row) <= width:
                raise UserError(f"{where}: {len(row)} tab-separated fields, {task.name} needs at least {width + 1}; "
                                f"is this the right file for {task.name}?")
            yield _example(task, row, position, where)


def _column_positions(path: Path, columns: Columns, header: list[str] | None) -> Columns:
    if header is None:
        raise UserError(f"{path} is empty; expected a header row")
    names = [h.strip() for h in header]

    def position(name):
        if name is None:
            return None
        if name not in names:
            raise UserError(f"{path}:1: header has no column {name!r} (found {', '.join(names)}); "
                            f"is this the right file?")
        return names.index(name)

    return Columns(position(columns.text_a), position(columns.text_b), position(columns.label), position(columns.index))


def _example(task: GlueTask, row: list[str], position: Columns, where: str) -> GlueExample:
    label = None if position.label is None else _parse_label(task, row[position.label].strip(), where)
    return GlueExample(
        guid=where.rsplit("/", 1)[-1],
        text_a=row[position.text_a],
        text_b=None if position.text_b is None else row[position.text_b],
        label=label,
        index=None if position.index is None else row[position.index].strip(),
    )


def _parse_label(task: GlueTask, raw: str, where: str) -> str | float:
    if task.is_regression:
        try:
            score = float(raw)
        except ValueError:
            raise UserError(f"{where}: {task.name} score {raw!r} is not a number") from None
        if not 0.0 <= score <= 5.0:
            raise UserError(f"{where}: {task.name} score {score} is outside [0, 5]")
        return score
    label = (task.tsv_labels or {}).get(raw, raw)
    if label not in task.labels:
        raise UserError(f"{where}: label {raw!r} is not one of {task.name}'s labels ({', '.join(task.labels)})")
    return label


# --- Hugging Face hub ----------------------------------------------------------------------

HUB_DATASET = "nyu-mll/glue"


def hub_records(dataset: str, config: str, split: str) -> Iterable[dict[str, Any]]:
    """Records of one hub split; imported lazily (the `hub` extra) and replaced in tests."""
    try:
        import datasets
    except ImportError:
        raise UserError("reading GLUE from the hub needs the 'datasets' package: pip install 'autotinybert[hub]', "
                        "or pass --data-dir with local files") from None
    try:
        return datasets.load_dataset(dataset, config, split=split)
    except Exception as err:  # offline, unknown config, ...: the user's environment, not a bug
        raise UserError(f"could not load {dataset}/{config} split {split} from the hub ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); pass --data-dir with local files") from None


def load_hub_split(task: GlueTask, split: str, loader: Callable[..., Iterable[dict]] | None = None) -> GlueSplit:
    """One split from the hub's GLUE (integer labels in ClassLabel order, -1 for test)."""
    if split not in task.hub_splits:
        raise UserError(f"{task.name} has no split {split!r} on the hub; it has {', '.join(task.hub_splits)}")
    hub_split = task.hub_splits[split]
    source = f"hub:{HUB_DATASET}/{task.name}:{hub_split}"
    field_a, field_b = task.hub_fields
    examples = []
    for number, record in enumerate((loader or hub_records)(HUB_DATASET, task.name, hub_split)):
        where = f"{source}:{number}"
        missing = [f for f in (field_a, field_b, "label") if f is not None and f not in record]
        if missing:
            raise UserError(f"{where}: record has no field {missing[0]!r}; is this GLUE {task.name}?")
        examples.append(GlueExample(
            guid=where, text_a=record[field_a], text_b=None if field_b is None else record[field_b],
            label=_hub_label(task, record["label"], where), index=str(record.get("idx", number)),
        ))
    if not examples:
        raise UserError(f"{source} has no records")
    return GlueSplit(task.name, split, tuple(examples), source)


def _hub_label(task: GlueTask, raw: Any, where: str) -> str | float | None:
    if task.is_regression:
        return None if raw is None or float(raw) < 0 else float(raw)
    if raw == -1:
        return None  # test split
    if not isinstance(raw, int) or not 0 <= raw < len(task.labels):
        raise UserError(f"{where}: label {raw!r} is not a {task.name} class index (0..{len(task.labels) - 1})")
    return task.labels[raw]


# --- both sources --------------------------------------------------------------------------

def load_split(task: GlueTask, split: str, data_dir: str | Path | None, loader=None) -> GlueSplit:
    """A split from `data_dir` (local layout) or, when `data_dir` is None, from the hub."""
    if data_dir is None:
        return load_hub_split(task, split, loader)
    return load_local_split(task, data_dir, split)


def available_test_splits(task: GlueTask, data_dir: str | Path | None) -> list[str]:
    """Test splits present locally (hub: all); submission files are written for these."""
    if data_dir is None:
        return list(task.test_files)
    directory = task_directory(task, data_dir)
    return [split for split, name in task.test_files.items() if (directory / name).is_file()]


def load_diagnostic(data_dir: str | Path) -> GlueSplit | None:
    """The unlabeled GLUE diagnostic set (AX), if `data_dir` holds it."""
    folder, file_name, _ = DIAGNOSTIC
    for base in (Path(data_dir), Path(data_dir) / "glue"):
        path = base / folder / file_name
        if path.is_file():
            columns = Columns("sentence1", "sentence2", None, "index")
            return GlueSplit("mnli", "diagnostic", tuple(_read_tsv(GLUE_TASKS["mnli"], path, columns)), str(path))
    return None


def subset(split: GlueSplit, limit: int | None, seed: int = 0) -> GlueSplit:
    """At most `limit` examples, a seeded random sample kept in file order (files can be sorted
    by source or label, so the first N would be a biased budget)."""
    if limit is None or limit >= len(split.examples):
        return split
    if limit <= 0:
        raise UserError(f"example limit must be positive, got {limit}")
    chosen = sorted(random.Random(seed).sample(range(len(split.examples)), limit))
    return GlueSplit(split.task, split.split, tuple(split.examples[i] for i in chosen), split.source)


def label_ids(task: GlueTask, examples: Iterable[GlueExample]) -> list[int] | list[float]:
    """Training targets: class indices, or the STS-B scores."""
    if task.is_regression:
        return [float(e.label) for e in examples]
    index = {name: i for i, name in enumerate(task.labels)}
    return [index[e.label] for e in examples]


def submission_value(task: GlueTask, prediction: int | float) -> str:
    """How the GLUE server wants a prediction: label text for NLI tasks, 0/1, or a score."""
    if task.is_regression:
        return f"{min(5.0, max(0.0, float(prediction))):.3f}"
    return task.labels[int(prediction)]
