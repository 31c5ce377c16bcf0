"""SQuAD v1.1 and v2.0: loading, sliding-window features, and span post-processing.

Data comes from the official JSON files (`train-v1.1.json`, `dev-v1.1.json`, `train-v2.0.json`,
`dev-v2.0.json`) or from the hub datasets `rajpurkar/squad` / `rajpurkar/squad_v2`; both give
`SquadExample`s. Every training answer must sit at its `answer_start` in the context: a
misaligned answer would silently train on the wrong span, so it is an error naming the file,
line and question id.

Features and post-processing follow Hugging Face's `run_qa.py` (itself BERT's `run_squad.py`):
a fast tokenizer cuts the context into windows of `max_seq_length` tokens that overlap by
`doc_stride` tokens (tokenizer `stride`), answers outside a window point at [CLS], and a
question's answer is the best-scoring span over its windows (n-best start/end logits, at most
`max_answer_length` tokens). SQuAD v2.0 predicts "no answer" when the [CLS] ("null") score beats
the best span by more than `null_score_threshold` (BERT's `null_score_diff_threshold`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ..errors import UserError, reading


@dataclass(frozen=True)
class SquadTask:
    name: str            # "squad" (v1.1) or "squad_v2"
    version: str         # "1.1" or "2.0"
    train_file: str
    dev_file: str
    hub_dataset: str

    @property
    def with_no_answer(self) -> bool:
        return self.version == "2.0"

    @property
    def default_max_seq_length(self) -> int:
        """The sequence length when --max-seq-length is not given (BERT's SQuAD recipe)."""
        return 384

    @property
    def main_dev_split(self) -> str:
        return "dev"


SQUAD_TASKS = {
    "squad": SquadTask("squad", "1.1", "train-v1.1.json", "dev-v1.1.json", "rajpurkar/squad"),
    "squad_v2": SquadTask("squad_v2", "2.0", "train-v2.0.json", "dev-v2.0.json", "rajpurkar/squad_v2"),
}
_ALIASES = {"squad1": "squad", "squad1.1": "squad", "squad11": "squad", "squad-v1.1": "squad",
            "squad2": "squad_v2", "squad2.0": "squad_v2", "squad20": "squad_v2", "squad-v2": "squad_v2",
            "squad-v2.0": "squad_v2", "squadv2": "squad_v2"}


def squad_task(name: str) -> SquadTask:
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in SQUAD_TASKS:
        raise UserError(f"unknown SQuAD task {name!r}; choose squad (v1.1) or squad_v2")
    return SQUAD_TASKS[key]


@dataclass(frozen=True)
class Answer:
    text: str
    start: int           # character offset in the context


@dataclass(frozen=True)
class SquadExample:
    qid: str
    title: str
    context: str
    question: str
    answers: tuple[Answer, ...]   # empty: unanswerable (v2.0)


@dataclass(frozen=True)
class SquadSplit:
    task: str
    split: str
    examples: tuple[SquadExample, ...]
    source: str


# --- loading ---------------------------------------------------------------------------------

def squad_file(task: SquadTask, data_dir: str | Path, split: str) -> Path:
    """`data_dir/<file>` or `data_dir/squad/<file>`."""
    data_dir = Path(data_dir)
    name = task.train_file if split == "train" else task.dev_file
    for candidate in (data_dir / name, data_dir / "squad" / name):
        if candidate.is_file():
            return candidate
    raise UserError(f"missing file {data_dir / name} (nor {data_dir / 'squad' / name}); point --data-dir at the "
                    f"folder with the official SQuAD {task.version} JSON files, or pass --{split}-file")


def load_json_split(task: SquadTask, path: str | Path, split: str) -> SquadSplit:
    """Read an official SQuAD JSON file; `split` == "train" requires aligned answers."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing file {path}")
    with reading(path, fix=f"give the official SQuAD {task.version} JSON file"):
        raw = path.read_text(encoding="utf-8")
    try:
        document = json.loads(raw)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        raise UserError(f"{path}: not a SQuAD file (no top-level 'data' list)")
    examples = []
    for article_number, article in enumerate(document["data"]):
        for paragraph_number, paragraph in enumerate(_field(article, "paragraphs", list, path, raw, f"data[{article_number}]")):
            place = f"data[{article_number}].paragraphs[{paragraph_number}]"
            context = _field(paragraph, "context", str, path, raw, place)
            for question_number, qa in enumerate(_field(paragraph, "qas", list, path, raw, place)):
                examples.append(_json_example(task, article, context, qa, path, raw, f"{place}.qas[{question_number}]", split))
    if not examples:
        raise UserError(f"{path} has no questions")
    _check_unique_ids(examples, path)
    return SquadSplit(task.name, split, tuple(examples), str(path))


def _json_example(task, article, context, qa, path, raw, place, split) -> SquadExample:
    qid = str(_field(qa, "id", (str, int), path, raw, place))

    def where() -> str:  # only on errors: locating the line scans the file
        return _where(path, raw, place, qid)

    question = _field(qa, "question", str, path, raw, place)
    impossible = bool(qa.get("is_impossible", False))
    if impossible and not task.with_no_answer:
        raise UserError(f"{where()}: unanswerable question in a SQuAD 1.1 file; use task squad_v2")
    answers = []
    for answer in ([] if impossible else _field(qa, "answers", list, path, raw, place)):
        if not isinstance(answer, dict) or not isinstance(answer.get("text"), str):
            raise UserError(f"{where()}: an answer has no 'text'")
        answers.append(Answer(answer["text"], int(answer.get("answer_start", -1))))
    if not answers and not impossible:
        raise UserError(f"{where()}: question has no answers and is not marked is_impossible")
    example = SquadExample(qid, str(article.get("title", "")), context, question, tuple(answers))
    if split == "train":
        _check_aligned(example, where)
    return example


def _field(record: Any, name: str, kind, path: Path, raw: str, place: str):
    if not isinstance(record, dict) or name not in record:
        raise UserError(f"{path}: {place} has no {name!r}; is this an official SQuAD file?")
    value = record[name]
    if not isinstance(value, kind):
        raise UserError(f"{path}: {place}.{name} has the wrong type ({type(value).__name__})")
    return value


def _where(path: Path, raw: str, place: str, qid: str) -> str:
    """'file:line: place (id ...)' — the line is found by the question id's position."""
    offset = raw.find(f'"{qid}"')
    line = f":{raw.count(chr(10), 0, offset) + 1}" if offset >= 0 else ""
    return f"{path}{line}: {place} (id {qid})"


def _check_aligned(example: SquadExample, where: str | Callable[[], str]) -> None:
    for answer in example.answers:
        found = example.context[answer.start: answer.start + len(answer.text)] if answer.start >= 0 else None
        if found != answer.text:
            raise UserError(f"{where() if callable(where) else where}: answer {answer.text!r} is not found in the context at answer_start "
                            f"{answer.start} (context there reads {found!r})")


def _check_unique_ids(examples: Sequence[SquadExample], source) -> None:
    seen = set()
    for example in examples:
        if example.qid in seen:
            raise UserError(f"{source}: question id {example.qid} occurs twice; ids must be unique")
        seen.add(example.qid)


def hub_records(dataset: str, split: str) -> Iterable[dict[str, Any]]:
    """Records of a hub SQuAD split; imported lazily (the `hub` extra) and replaced in tests."""
    try:
        import datasets
    except ImportError:
        raise UserError("reading SQuAD from the hub needs the 'datasets' package: pip install 'autotinybert[hub]', "
                        "or pass --data-dir with the JSON files") from None
    try:
        return datasets.load_dataset(dataset, split=split)
    except Exception as err:
        raise UserError(f"could not load {dataset} split {split} from the hub ({type(err).__name__}); "
                        f"pass --data-dir with the JSON files") from None


def load_hub_split(task: SquadTask, split: str, loader: Callable[..., Iterable[dict]] | None = None) -> SquadSplit:
    """Hub records: id, title, context, question, answers = {text: [...], answer_start: [...]}."""
    hub_split = {"train": "train", "dev": "validation"}.get(split)
    if hub_split is None:
        raise UserError(f"{task.name} has no split {split!r}; it has train and dev")
    source = f"hub:{task.hub_dataset}:{hub_split}"
    examples = []
    for number, record in enumerate((loader or hub_records)(task.hub_dataset, hub_split)):
        where = f"{source}:{number} (id {record.get('id')})"
        missing = [f for f in ("id", "context", "question", "answers") if f not in record]
        if missing:
            raise UserError(f"{where}: record has no field {missing[0]!r}; is this {task.hub_dataset}?")
        texts, starts = record["answers"].get("text", []), record["answers"].get("answer_start", [])
        if len(texts) != len(starts):
            raise UserError(f"{where}: {len(texts)} answer texts but {len(starts)} answer starts")
        if not texts and not task.with_no_answer:
            raise UserError(f"{where}: question has no answers; unanswerable questions need task squad_v2")
        example = SquadExample(str(record["id"]), str(record.get("title", "")), record["context"], record["question"],
                               tuple(Answer(t, int(s)) for t, s in zip(texts, starts)))
        if split == "train":
            _check_aligned(example, where)
        examples.append(example)
    if not examples:
        raise UserError(f"{source} has no records")
    _check_unique_ids(examples, source)
    return SquadSplit(task.name, split, tuple(examples), source)


def load_split(task: SquadTask, split: str, data_dir: str | Path | None, file: str | Path | None = None,
               loader=None) -> SquadSplit:
    """A split from an explicit `file`, from `data_dir`, or (both None) from the hub."""
    if file is not None:
        return load_json_split(task, file, split)
    if data_dir is None:
        return load_hub_split(task, split, loader)
    return load_json_split(task, squad_file(task, data_dir, split), split)


def subset(split: SquadSplit, limit: int | None, seed: int = 0) -> SquadSplit:
    """At most `limit` questions, a seeded random sample kept in file order."""
    if limit is None or limit >= len(split.examples):
        return split
    if limit <= 0:
        raise UserError(f"example limit must be positive, got {limit}")
    chosen = sorted(random.Random(seed).sample(range(len(split.examples)), limit))
    return SquadSplit(split.task, split.split, tuple(split.examples[i] for i in chosen), split.source)


def split_by_article(path: str | Path, train_out: str | Path, dev_out: str | Path, dev_articles: int,
                     seed: int = 0) -> tuple[list[str], list[str]]:
    """Split one SQuAD JSON file into two by *article*, so no context is shared between them.

    For budgets where only a dev file exists: train on some articles, evaluate on the others.
    Returns (train titles, dev titles).
    """
    from ..files import atomic_write_json

    document = json.loads(Path(path).read_text(encoding="utf-8"))
    articles = document["data"]
    if not 0 < dev_articles < len(articles):
        raise UserError(f"{path} has {len(articles)} articles; dev_articles must be between 1 and {len(articles) - 1}")
    held_out = set(random.Random(seed).sample(range(len(articles)), dev_articles))
    dev = [a for i, a in enumerate(articles) if i in held_out]
    train = [a for i, a in enumerate(articles) if i not in held_out]
    version = document.get("version", "")
    atomic_write_json(train_out, {"version": version, "data": train})
    atomic_write_json(dev_out, {"version": version, "data": dev})
    return [a.get("title", "") for a in train], [a.get("title", "") for a in dev]


def gold_answers(examples: Iterable[SquadExample]) -> dict[str, list[str]]:
    return {e.qid: [a.text for a in e.answers] for e in examples}


# --- features -------------------------------------------------------------------------------

def _encode(tokenizer, examples: Sequence[SquadExample], max_seq_length: int, doc_stride: int):
    if not getattr(tokenizer, "is_fast", False):
        raise UserError("SQuAD needs a fast tokenizer (offset mappings); the model's tokenizer is a slow one")
    if not 0 <= doc_stride < max_seq_length // 2:
        raise UserError(f"--doc-stride {doc_stride} must be below half of --max-seq-length {max_seq_length}")
    # Questions are truncated never; contexts ("only_second") are windowed.
    return tokenizer(
        [e.question.lstrip() for e in examples], [e.context for e in examples],
        truncation="only_second", max_length=max_seq_length, stride=doc_stride,
        return_overflowing_tokens=True, return_offsets_mapping=True, padding=False,
    )


def _model_inputs(encoding, i: int) -> dict[str, list[int]]:
    keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in encoding]
    return {k: encoding[k][i] for k in keys}


def train_features(tokenizer, examples: Sequence[SquadExample], max_seq_length: int, doc_stride: int) -> list[dict]:
    """One feature per window: model inputs plus start/end token positions ([CLS]=0 if outside)."""
    encoding = _encode(tokenizer, examples, max_seq_length, doc_stride)
    features = []
    for i, example_index in enumerate(encoding["overflow_to_sample_mapping"]):
        example = examples[example_index]
        feature = _model_inputs(encoding, i)
        start, end = 0, 0
        if example.answers:
            answer = example.answers[0]  # SQuAD train has one answer per question
            start, end = _token_span(encoding, i, answer.start, answer.start + len(answer.text))
        feature["start_positions"], feature["end_positions"] = start, end
        features.append(feature)
    return features


def _token_span(encoding, i: int, start_char: int, end_char: int) -> tuple[int, int]:
    offsets, sequence_ids = encoding["offset_mapping"][i], encoding.sequence_ids(i)
    context = [t for t, s in enumerate(sequence_ids) if s == 1]
    first, last = context[0], context[-1]
    if offsets[first][0] > start_char or offsets[last][1] < end_char:
        return 0, 0  # answer not (fully) in this window
    start = first
    while start <= last and offsets[start][1] <= start_char:
        start += 1
    end = last
    while end >= first and offsets[end][0] >= end_char:
        end -= 1
    return start, end


def eval_features(tokenizer, examples: Sequence[SquadExample], max_seq_length: int, doc_stride: int) -> list[dict]:
    """One feature per window, with the example index and context-only character offsets."""
    encoding = _encode(tokenizer, examples, max_seq_length, doc_stride)
    features = []
    for i, example_index in enumerate(encoding["overflow_to_sample_mapping"]):
        sequence_ids = encoding.sequence_ids(i)
        feature = _model_inputs(encoding, i)
        feature["example_index"] = example_index
        feature["offsets"] = [o if s == 1 else None for o, s in zip(encoding["offset_mapping"][i], sequence_ids)]
        features.append(feature)
    return features


@dataclass(frozen=True)
class SpanPrediction:
    text: str            # best non-null span
    score: float         # its start + end logit
    null_score: float    # [CLS] start + end logit (lowest over the windows)


def best_spans(examples: Sequence[SquadExample], features: Sequence[dict], start_logits, end_logits,
               n_best: int = 20, max_answer_length: int = 30) -> dict[str, SpanPrediction]:
    """The best span of each question over its windows (run_qa.py `postprocess_qa_predictions`)."""
    by_example: dict[int, list[int]] = {}
    for feature_index, feature in enumerate(features):
        by_example.setdefault(feature["example_index"], []).append(feature_index)
    predictions = {}
    for example_index, feature_indices in by_example.items():
        example = examples[example_index]
        best_text, best_score, null_score = "", float("-inf"), float("inf")
        for f in feature_indices:
            starts, ends, offsets = start_logits[f], end_logits[f], features[f]["offsets"]
            null_score = min(null_score, float(starts[0] + ends[0]))
            for s in _top(starts, n_best, len(offsets)):
                for e in _top(ends, n_best, len(offsets)):
                    if offsets[s] is None or offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                        continue
                    score = float(starts[s] + ends[e])
                    if score > best_score:
                        best_text, best_score = example.context[offsets[s][0]: offsets[e][1]], score
        predictions[example.qid] = SpanPrediction(best_text, best_score, null_score)
    return predictions


def _top(logits, n: int, length: int) -> list[int]:
    import numpy as np

    values = np.asarray(logits[:length], dtype=np.float64)
    return np.argsort(-values, kind="stable")[:n].tolist()


def final_answers(spans: dict[str, SpanPrediction], with_no_answer: bool, null_score_threshold: float = 0.0) -> dict[str, str]:
    """v1.1: the best span; v2.0: "" when null score - best span score > threshold."""
    if not with_no_answer:
        return {qid: p.text for qid, p in spans.items()}
    return {qid: ("" if p.null_score - p.score > null_score_threshold else p.text) for qid, p in spans.items()}


def null_odds(spans: dict[str, SpanPrediction]) -> dict[str, float]:
    return {qid: p.null_score - p.score for qid, p in spans.items()}
