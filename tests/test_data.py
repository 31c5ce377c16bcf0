import numpy as np
import pytest
import torch

from autotinybert import data
from autotinybert.data import build_dataset, mask_tokens, pack_document, read_documents, train_wordpiece
from autotinybert.errors import UserError

TEXT = """The committee met on Tuesday to discuss the budget.
Members raised concerns about the cost of the new bridge.
The chair promised a detailed report next month.

A storm hit the coast early on Friday morning.
Thousands of homes lost power for several hours.
Crews worked through the weekend to restore the lines.

The library opened a new reading room for children.
Volunteers read stories every Saturday afternoon.

"""


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT * 20, encoding="utf-8")
    return path


@pytest.fixture
def tokenizer(tmp_path, corpus):
    return train_wordpiece([corpus], 120, tmp_path / "tok")


def test_documents_are_split_on_blank_lines(corpus):
    docs = list(read_documents(corpus))
    assert len(docs) == 60 and docs[0][0].startswith("The committee") and len(docs[1]) == 3


def test_packing_never_exceeds_the_length_nor_mixes_documents():
    sentences = [[5] * 7, [6] * 30, [7] * 3]
    rows = list(pack_document(sentences, seq_len=12, cls_id=1, sep_id=2))
    assert all(len(r) <= 12 and r[0] == 1 and r[-1] == 2 for r in rows)
    assert sum(len(r) - 2 for r in rows) == 40  # every token kept exactly once
    assert [t for r in rows for t in r[1:-1]] == [5] * 7 + [6] * 30 + [7] * 3


def test_packed_dataset_respects_length_and_documents(tmp_path, corpus, tokenizer):
    train, valid, _ = build_dataset([corpus], tokenizer, 16, tmp_path / "cache", valid_fraction=0.1)
    assert train.ids.shape[1] == 16 and len(valid) > 0
    assert (train.lengths <= 16).all() and (train.ids[:, 0] == tokenizer.cls_token_id).all()
    for row, length in zip(np.asarray(train.ids), train.lengths):
        assert row[length - 1] == tokenizer.sep_token_id and (row[length:] == tokenizer.pad_token_id).all()
        assert (row[1:length - 1] != tokenizer.sep_token_id).all()  # one segment, one document


def test_the_cache_is_reused(tmp_path, corpus, tokenizer, monkeypatch):
    _, _, entry = build_dataset([corpus], tokenizer, 16, tmp_path / "cache")
    calls = []
    monkeypatch.setattr(data, "_write_cache", lambda *a, **k: calls.append(a))
    train, _, again = build_dataset([corpus], tokenizer, 16, tmp_path / "cache")
    assert again == entry and calls == [] and isinstance(train.ids, np.memmap)
    # a different sequence length is a different cache entry
    monkeypatch.undo()
    _, _, other = build_dataset([corpus], tokenizer, 24, tmp_path / "cache")
    assert other != entry


def test_masking_statistics():
    gen = torch.Generator().manual_seed(0)
    special = [0, 1, 2, 3, 4]
    ids = torch.randint(5, 1000, (256, 128), generator=gen)
    ids[:, 0], ids[:, -1] = 2, 3
    mask = torch.ones_like(ids)
    mask[:, 100:] = 0
    masked, labels = mask_tokens(ids, mask, special, mask_id=4, vocab_size=1000, generator=gen)
    chosen = labels != -100
    maskable = mask.bool() & ~torch.isin(ids, torch.tensor(special))
    assert not chosen[~maskable].any()  # specials and padding never masked
    rate = chosen.sum().item() / maskable.sum().item()
    assert abs(rate - 0.15) < 0.01
    as_mask = (masked == 4) & chosen
    unchanged = (masked == ids) & chosen
    random_token = chosen & ~as_mask & ~unchanged
    n = chosen.sum().item()
    assert abs(as_mask.sum().item() / n - 0.8) < 0.02
    assert abs(unchanged.sum().item() / n - 0.1) < 0.02 + 0.001  # a random draw may equal the original
    assert abs(random_token.sum().item() / n - 0.1) < 0.02
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(masked[~chosen], ids[~chosen])


@pytest.mark.parametrize("content, message", [
    (b"", "contains no text"),
    (b"\n\n  \n", "contains no text"),
    (b"\x00\x01\x02binary", "looks binary"),
    (b"good line\n\xff\xfe bad\n", "corpus.txt:2: not valid UTF-8"),
])
def test_bad_corpora_are_clear_errors(tmp_path, tokenizer, content, message):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        build_dataset([path], tokenizer, 16, tmp_path / "cache")
    assert not any((tmp_path / "cache").glob("*/meta.json"))


def test_missing_corpus_is_a_clear_error(tmp_path, tokenizer):
    with pytest.raises(UserError, match="does not exist"):
        build_dataset([tmp_path / "nope.txt"], tokenizer, 16, tmp_path / "cache")


def test_hub_corpora_go_through_datasets(tmp_path, tokenizer, monkeypatch):
    import sys
    import types

    class FakeDataset(list):
        column_names = ["text", "id"]

    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return FakeDataset([{"text": TEXT, "id": 1}, {"text": "   ", "id": 2}, {"text": TEXT, "id": 3}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    train, valid, _ = build_dataset(["hf:wikitext:wikitext-2-raw-v1"], tokenizer, 16, tmp_path / "cache",
                                    valid_fraction=0.5)
    assert calls == [("wikitext", "wikitext-2-raw-v1", "train")]
    assert len(train) > 0 and len(valid) > 0
    with pytest.raises(UserError, match="no column 'body'"):
        build_dataset(["hf:other"], tokenizer, 16, tmp_path / "cache2", text_column="body")
