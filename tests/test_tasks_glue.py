"""GLUE loading: the classic local layout (with its quirks), hub-style records, bad input."""

import pytest

from autotinybert import UserError
from autotinybert.tasks import glue
from autotinybert.tasks.finetune import load_task_data, resolve_task, FinetuneSettings
from tasks_fixtures import SHARED_DATA, glue_layout, write


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
    return glue_layout(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("name", list(glue.GLUE_TASKS))
def test_every_task_loads_from_the_classic_layout(glue_dir, name):
    task = glue.glue_task(name)
    data = load_task_data(task, glue_dir)
    assert data.train.examples and all(e.label is not None for e in data.train.examples)
    assert set(data.dev) == set(task.dev_files)
    for example in data.train.examples:
        assert (example.text_b is None) == (task.train_columns.text_b is None)
        if task.is_regression:
            assert 0.0 <= example.label <= 5.0
        else:
            assert example.label in task.labels


def test_quirks(glue_dir):
    cola = glue.load_local_split(glue.glue_task("CoLA"), glue_dir, "train")  # no header row
    assert cola.examples[0].text_a == "the cat sat ." and cola.examples[0].label == "1"
    assert len(cola.examples) == 8 and cola.examples[0].guid == "train.tsv:1"
    mrpc = glue.load_local_split(glue.glue_task("mrpc"), glue_dir, "dev")   # byte-order mark in the header
    assert mrpc.examples[0].label == "1" and mrpc.examples[1].text_b == "paris is a city ."
    sst = glue.load_local_split(glue.glue_task("SST-2"), glue_dir, "train")  # QUOTE_NONE: a lone " is text
    assert sst.examples[-1].text_a.startswith('a " lone quote')
    mnli = load_task_data(glue.glue_task("mnli"), glue_dir)
    assert set(mnli.dev) == {"dev_matched", "dev_mismatched"} and set(mnli.test) == {"test_matched"}
    assert mnli.test["test_matched"].examples[0].index == "7" and mnli.test["test_matched"].examples[0].label is None
    assert mnli.dev["dev_matched"].examples[1].label == "contradiction"


def test_parent_folder_and_aliases_work(glue_dir):
    split = glue.load_local_split(glue.glue_task("sts-b"), glue_dir.parent / "glue_data", "dev")
    assert [e.label for e in split.examples] == [4.0, 0.0, 2.0]
    assert resolve_task("SST-2") is resolve_task("sst2")


def test_hub_records_give_the_same_representation(glue_dir):
    calls = []

    def fake_loader(dataset, config, split):
        calls.append((dataset, config, split))
        if config == "mnli":
            return [{"premise": "the cat sat .", "hypothesis": "the cat ran .", "label": 2, "idx": 0}]
        if config == "stsb":
            return [{"sentence1": "a cat .", "sentence2": "a cat .", "label": 4.0, "idx": 0},
                    {"sentence1": "a cat .", "sentence2": "paris .", "label": 0.0, "idx": 1},
                    {"sentence1": "a dog .", "sentence2": "a cat .", "label": 2.0, "idx": 2}]
        return [{"sentence": "a good movie ", "label": 1, "idx": 0}, {"sentence": "a bad movie ", "label": 0, "idx": 1}]

    mnli = glue.load_split(glue.glue_task("mnli"), "dev_mismatched", None, loader=fake_loader)
    assert calls[-1] == ("nyu-mll/glue", "mnli", "validation_mismatched")
    local = glue.load_local_split(glue.glue_task("mnli"), glue_dir, "dev_mismatched").examples[1]
    assert (mnli.examples[0].text_a, mnli.examples[0].text_b, mnli.examples[0].label) == \
           (local.text_a, local.text_b, local.label)
    hub_sts = glue.load_split(glue.glue_task("stsb"), "dev", None, loader=fake_loader)
    local_sts = glue.load_local_split(glue.glue_task("stsb"), glue_dir, "dev")
    assert [(e.text_a, e.text_b, e.label) for e in hub_sts.examples] == \
           [(e.text_a, e.text_b, e.label) for e in local_sts.examples]
    sst = glue.load_split(glue.glue_task("sst2"), "train", None, loader=fake_loader)
    assert [e.label for e in sst.examples] == ["1", "0"]
    test = glue.load_split(glue.glue_task("sst2"), "test", None, loader=lambda *a: [{"sentence": "x", "label": -1, "idx": 5}])
    assert test.examples[0].label is None and test.examples[0].index == "5"
    with pytest.raises(UserError, match=r"hub:nyu-mll/glue/sst2:train:0: label 7 is not a sst2 class index"):
        glue.load_split(glue.glue_task("sst2"), "train", None, loader=lambda *a: [{"sentence": "x", "label": 7}])
    with pytest.raises(UserError, match="record has no field 'sentence'"):
        glue.load_split(glue.glue_task("sst2"), "train", None, loader=lambda *a: [{"text": "x", "label": 1}])


def test_subset_is_seeded_and_keeps_file_order(glue_dir):
    split = glue.load_local_split(glue.glue_task("sst2"), glue_dir, "train")
    a, b = glue.subset(split, 5, seed=3), glue.subset(split, 5, seed=3)
    assert a == b and len(a.examples) == 5
    lines = [int(e.guid.split(":")[1]) for e in a.examples]
    assert lines == sorted(lines)
    assert glue.subset(split, None) is split


def test_submission_values():
    assert glue.submission_value(glue.glue_task("rte"), 1) == "not_entailment"
    assert glue.submission_value(glue.glue_task("cola"), 1) == "1"
    assert glue.submission_value(glue.glue_task("stsb"), 5.7) == "5.000"


# --- bad input: clear one-line errors naming file and line ---------------------------------

def test_unknown_task():
    with pytest.raises(UserError, match="unknown task 'sst3'; choose one of cola, sst2"):
        resolve_task("sst3")


def test_missing_folder_and_file(tmp_path, glue_dir):
    with pytest.raises(UserError, match="no RTE/ folder in"):
        glue.load_local_split(glue.glue_task("rte"), tmp_path, "train")
    write(tmp_path / "QNLI" / "dev.tsv", "index\tquestion\tsentence\tlabel\n")
    with pytest.raises(UserError, match=r"missing file .*QNLI/train.tsv"):
        glue.load_local_split(glue.glue_task("qnli"), tmp_path, "train")
    with pytest.raises(UserError, match="is not a directory"):
        glue.load_local_split(glue.glue_task("rte"), tmp_path / "nope", "train")


def test_wrong_columns(tmp_path):
    path = write(tmp_path / "RTE" / "train.tsv", "index\tpremise\thypothesis\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(UserError, match=r"RTE/train.tsv:1: header has no column 'sentence1'"):
        glue.load_local_split(glue.glue_task("rte"), tmp_path, "train")
    path.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tonly one field\n")
    with pytest.raises(UserError, match=r"RTE/train.tsv:3: 2 tab-separated fields, rte needs at least 4"):
        glue.load_local_split(glue.glue_task("rte"), tmp_path, "train")
    write(tmp_path / "CoLA" / "train.tsv", "src\t1\t\tgood .\nsrc\t1\n")
    with pytest.raises(UserError, match=r"CoLA/train.tsv:2: 2 tab-separated fields"):
        glue.load_local_split(glue.glue_task("cola"), tmp_path, "train")


def test_labels_outside_the_task(tmp_path):
    write(tmp_path / "RTE" / "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tneutral\n")
    with pytest.raises(UserError, match=r"RTE/train.tsv:3: label 'neutral' is not one of rte's labels"):
        glue.load_local_split(glue.glue_task("rte"), tmp_path, "train")
    write(tmp_path / "SST-2" / "train.tsv", "sentence\tlabel\ngood\t2\n")
    with pytest.raises(UserError, match=r"SST-2/train.tsv:2: label '2'"):
        glue.load_local_split(glue.glue_task("sst2"), tmp_path, "train")
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    write(tmp_path / "STS-B" / "train.tsv", head + "0\tg\tf\ty\t0\tn\tn\ta\tb\thigh\n")
    with pytest.raises(UserError, match=r"STS-B/train.tsv:2: stsb score 'high' is not a number"):
        glue.load_local_split(glue.glue_task("stsb"), tmp_path, "train")
    write(tmp_path / "STS-B" / "train.tsv", head + "0\tg\tf\ty\t0\tn\tn\ta\tb\t7.5\n")
    with pytest.raises(UserError, match=r"outside \[0, 5\]"):
        glue.load_local_split(glue.glue_task("stsb"), tmp_path, "train")


def test_settings_budgets_apply(glue_dir):
    data = load_task_data(glue.glue_task("sst2"), glue_dir, settings=FinetuneSettings(max_train_examples=3, max_eval_examples=2))
    assert len(data.train.examples) == 3 and len(data.dev["dev"].examples) == 2


@pytest.mark.skipif(not (SHARED_DATA / "glue").is_dir(), reason="shared GLUE data absent")
def test_real_files_have_the_official_sizes():
    sizes = {"cola": (8551, 1043), "sst2": (67349, 872), "mrpc": (3668, 408), "stsb": (5749, 1500),
             "rte": (2490, 277), "wnli": (635, 71)}
    for name, (train, dev) in sizes.items():
        data = load_task_data(glue.glue_task(name), SHARED_DATA / "glue", test=False)
        assert (len(data.train.examples), len(data.dev["dev"].examples)) == (train, dev), name
    qnli = glue.load_local_split(glue.glue_task("qnli"), SHARED_DATA / "glue", "dev")
    assert len(qnli.examples) == 5463
    assert len(glue.load_diagnostic(SHARED_DATA / "glue").examples) == 1104
