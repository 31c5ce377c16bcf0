"""SQuAD loading (JSON and hub records), sliding-window features, span post-processing."""

import json

import numpy as np
import pytest

from autotinybert import UserError
from autotinybert.tasks import squad
from tasks_fixtures import CONTEXT, SHARED_DATA, squad_document, squad_files, tiny_tokenizer, write

V1, V2 = squad.squad_task("squad"), squad.squad_task("squad2.0")


def test_json_and_hub_give_the_same_examples(tmp_path):
    folder = squad_files(tmp_path, "1.1")
    local = squad.load_split(V1, "train", tmp_path)  # finds squad/train-v1.1.json
    assert local.examples[0].answers == (squad.Answer("paris", 0), squad.Answer("paris", 0))
    assert len(local.examples) == 5 and local.examples[3].title == "Cats"
    records = [{"id": e.qid, "title": e.title, "context": e.context, "question": e.question,
                "answers": {"text": [a.text for a in e.answers], "answer_start": [a.start for a in e.answers]}}
               for e in local.examples]
    calls = []
    hub = squad.load_split(V1, "train", None, loader=lambda name, split: calls.append((name, split)) or records)
    assert calls == [("rajpurkar/squad", "train")]
    assert hub.examples == local.examples
    assert squad.load_split(V1, "dev", None, file=folder / "dev-v1.1.json").examples == local.examples


def test_v2_unanswerable(tmp_path):
    squad_files(tmp_path, "2.0")
    split = squad.load_split(V2, "dev", tmp_path / "squad")
    assert split.examples[3].answers == () and squad.gold_answers(split.examples)["q4"] == []
    with pytest.raises(UserError, match=r"q4\): unanswerable question in a SQuAD 1.1 file; use task squad_v2"):
        squad.load_json_split(V1, tmp_path / "squad" / "dev-v2.0.json", "dev")


def test_answer_not_in_context_names_file_line_and_id(tmp_path):
    document = squad_document()
    document["data"][0]["paragraphs"][0]["qas"][1]["answers"][0]["answer_start"] = 5
    path = write(tmp_path / "train.json", json.dumps(document, indent=1))
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if '"id": "q2"' in text)
    with pytest.raises(UserError, match=rf"train.json:{line}: data\[0\].paragraphs\[0\].qas\[1\] \(id q2\): answer "
                                        r"'the rhine' is not found in the context at answer_start 5"):
        squad.load_json_split(V1, path, "train")
    assert squad.load_json_split(V1, path, "dev").examples[1].qid == "q2"  # evaluation only uses the text
    bad = [{"id": "x", "context": "abc", "question": "q", "answers": {"text": ["zz"], "answer_start": [0]}}]
    with pytest.raises(UserError, match=r"hub:rajpurkar/squad:train:0 \(id x\): answer 'zz' is not found"):
        squad.load_split(V1, "train", None, loader=lambda *a: bad)


def test_malformed_files(tmp_path):
    with pytest.raises(UserError, match=r"bad.json:2: not valid JSON"):
        squad.load_json_split(V1, write(tmp_path / "bad.json", '{"data": [\n,]}'), "dev")
    with pytest.raises(UserError, match="no top-level 'data' list"):
        squad.load_json_split(V1, write(tmp_path / "list.json", "[]"), "dev")
    document = squad_document()
    del document["data"][0]["paragraphs"][0]["qas"][0]["question"]
    with pytest.raises(UserError, match=r"data\[0\].paragraphs\[0\].qas\[0\] has no 'question'"):
        squad.load_json_split(V1, write(tmp_path / "q.json", json.dumps(document)), "dev")
    document = squad_document()
    document["data"][1]["paragraphs"][0]["qas"][1]["id"] = "c0"
    with pytest.raises(UserError, match="question id c0 occurs twice"):
        squad.load_json_split(V1, write(tmp_path / "dup.json", json.dumps(document)), "dev")
    with pytest.raises(UserError, match=r"missing file .*train-v1.1.json"):
        squad.load_split(V1, "train", tmp_path)
    with pytest.raises(UserError, match="unknown SQuAD task 'squad3'"):
        squad.squad_task("squad3")


def test_train_features_point_at_the_answer():
    tokenizer = tiny_tokenizer()
    examples = squad.load_split(V1, "train", None, loader=lambda *a: [
        {"id": "a", "context": CONTEXT, "question": "where did the cat sat ?",
         "answers": {"text": ["on the mat"], "answer_start": [73]}}]).examples
    whole = squad.train_features(tokenizer, examples, max_seq_length=384, doc_stride=128)
    assert len(whole) == 1
    start, end = whole[0]["start_positions"], whole[0]["end_positions"]
    assert tokenizer.decode(whole[0]["input_ids"][start:end + 1]) == "on the mat"
    # Short windows: several features; the answer is inside some, [CLS] (0) elsewhere.
    windows = squad.train_features(tokenizer, examples, max_seq_length=24, doc_stride=4)
    assert len(windows) > 1
    targets = [(f["start_positions"], f["end_positions"]) for f in windows]
    assert (0, 0) in targets
    assert {tokenizer.decode(f["input_ids"][s:e + 1]) for f, (s, e) in zip(windows, targets) if s} == {"on the mat"}


def test_best_span_over_windows_and_null_threshold():
    tokenizer = tiny_tokenizer()
    example = squad.SquadExample("a", "", CONTEXT, "what is long ?", (squad.Answer("the rhine", 33),))
    features = squad.eval_features(tokenizer, [example], max_seq_length=24, doc_stride=4)
    assert len(features) > 1
    target = next(i for i, f in enumerate(features) if any(o and CONTEXT[o[0]:o[1]] == "rhine" for o in f["offsets"]))
    starts, ends = [np.zeros(len(f["input_ids"])) for f in features], [np.zeros(len(f["input_ids"])) for f in features]
    token = next(t for t, o in enumerate(features[target]["offsets"]) if o and CONTEXT[o[0]:o[1]] == "the"
                 and CONTEXT[o[1] + 1:o[1] + 6] == "rhine")
    starts[target][token], ends[target][token + 1] = 5.0, 4.0
    for s, e in zip(starts, ends):
        s[0], e[0] = 1.0, 1.0  # null score 2 in every window
    spans = squad.best_spans([example], features, starts, ends)
    assert spans["a"] == squad.SpanPrediction("the rhine", 9.0, 2.0)
    assert squad.final_answers(spans, with_no_answer=False) == {"a": "the rhine"}
    assert squad.final_answers(spans, with_no_answer=True, null_score_threshold=0.0) == {"a": "the rhine"}
    assert squad.final_answers(spans, with_no_answer=True, null_score_threshold=-8.0) == {"a": ""}
    assert squad.null_odds(spans) == {"a": -7.0}


def test_split_by_article_shares_no_context(tmp_path):
    source = write(tmp_path / "all.json", json.dumps(squad_document()))
    train_titles, dev_titles = squad.split_by_article(source, tmp_path / "t.json", tmp_path / "d.json", dev_articles=1)
    assert sorted(train_titles + dev_titles) == ["Cats", "France"] and len(dev_titles) == 1
    train, dev = squad.load_json_split(V1, tmp_path / "t.json", "train"), squad.load_json_split(V1, tmp_path / "d.json", "dev")
    assert not {e.qid for e in train.examples} & {e.qid for e in dev.examples}
    with pytest.raises(UserError, match="dev_articles must be between 1 and 1"):
        squad.split_by_article(source, tmp_path / "t.json", tmp_path / "d.json", dev_articles=2)


@pytest.mark.skipif(not (SHARED_DATA / "squad" / "dev-v1.1.json").is_file(), reason="shared SQuAD data absent")
def test_real_dev_file_loads_with_aligned_answers():
    split = squad.load_split(V1, "train", SHARED_DATA, file=SHARED_DATA / "squad" / "dev-v1.1.json")  # "train": checks alignment
    assert len(split.examples) == 10570
