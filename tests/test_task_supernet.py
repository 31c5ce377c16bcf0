"""The task route's SuperPLM: built from a fine-tuned source, sliced by a depth order, trained on
the task with recorded teacher logits (tiny odd-sized models, seconds each)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml

from conftest import randomise_parameters
from tasks_fixtures import glue_layout, interrupt_after_first_checkpoint, tiny_tokenizer

from autotinybert import task_supernet
from autotinybert.errors import Preempted
from autotinybert.export import extract
from autotinybert.settings import FinetuneSettings, TaskSuperPLMSettings
from autotinybert.space import Arch
from autotinybert.tasks import finetune
from autotinybert.tasks.glue import glue_task


def _finetuned_source(path, num_labels: int = 2, seed: int = 0):
    """A tiny odd-sized BertForSequenceClassification (hidden 36, 3 layers, FFN 37, 4 heads) with
    random LayerNorms (ones/zeros hide slicing bugs), saved with its tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = tiny_tokenizer()
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=36, num_hidden_layers=3, intermediate_size=37,
                        num_attention_heads=4, max_position_embeddings=64, num_labels=num_labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config)
    randomise_parameters(model, seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _task_data(tmp_path, task_name: str = "sst2", validation: int | None = 1):
    task = glue_task(task_name)
    settings = FinetuneSettings(validation_examples=validation, progress=False, batch_size=4, max_steps=4)
    glue = glue_layout(tmp_path)
    if task_name == "stsb":  # enough rows to carve a tenth
        train = glue / "STS-B" / "train.tsv"
        header, *rows = train.read_text().splitlines()
        train.write_text("\n".join([header, *(rows * 4)]) + "\n")
    return task, finetune.load_task_data(task, glue, test=False, settings=settings), settings


def _superplm(tmp_path, mode="kd", depth_order="spaced", importance="activation", task_name="sst2"):
    task, data, ft = _task_data(tmp_path, task_name)
    source = _finetuned_source(tmp_path / "source", task.num_labels)
    tokenizer = tiny_tokenizer()
    features = finetune.train_features(task, tokenizer, data.train, ft)
    settings = TaskSuperPLMSettings(mode=mode, depth_order=depth_order, importance=importance, calibration_examples=8)
    model, summary = task_supernet.task_superplm_from_source(source, task, tokenizer, features, settings)
    return model, summary, source, task, data, ft, tokenizer


@pytest.mark.parametrize("mode", ["kd", "mlm"])
def test_the_largest_sub_model_equals_the_finetuned_source_before_training(tmp_path, mode):
    from transformers import AutoModelForSequenceClassification

    model, summary, source, *_ = _superplm(tmp_path, mode=mode)
    assert summary["max_abs_diff"] < 1e-5
    original = AutoModelForSequenceClassification.from_pretrained(source).eval()
    inputs = {"input_ids": torch.tensor([[2, 7, 9, 11, 3, 0], [2, 8, 3, 12, 13, 3]]),
              "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]),
              "token_type_ids": torch.tensor([[0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1]])}
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, original(**inputs).logits, atol=1e-5, rtol=1e-5)
    # The order really moved units (a no-op ordering would pass the check above trivially).
    assert not torch.equal(model.bert.embeddings.word_embeddings.weight, original.bert.embeddings.word_embeddings.weight)


@pytest.mark.parametrize("depth_order, kept", [("first", (0, 1)), ("spaced", (0, 2)), ("importance", None)])
def test_every_depth_order_exports_the_sliced_model(tmp_path, depth_order, kept):
    from transformers import AutoModelForSequenceClassification

    model, summary, *_ = _superplm(tmp_path, depth_order=depth_order)
    if kept is None:  # importance: the two layers whose removal moves the outputs most
        scores = summary["layer_scores"]
        kept = tuple(sorted(sorted(range(3), key=lambda i: -scores[i])[:2]))
    assert model.config.kept_layers(2) == kept
    arch = Arch(2, 28, 29, 4, 24)
    exported = extract(model, arch)
    assert type(exported).__name__.endswith("ForSequenceClassification")
    exported.save_pretrained(tmp_path / "exported")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "exported").eval()
    model.set_arch(arch)
    inputs = {"input_ids": torch.tensor([[2, 7, 9, 11, 3, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0]])}
    with torch.no_grad():
        sliced = model(**inputs).logits
        torch.testing.assert_close(exported(**inputs).logits, sliced)
        torch.testing.assert_close(reloaded(**inputs).logits, sliced)
    # The export runs the kept layers: its first layer is the SuperPLM's layer kept[0].
    torch.testing.assert_close(exported.bert.encoder.layer[1].output.dense.bias,
                               model.bert.encoder.layer[kept[1]].output.dense.bias[:28])


def test_a_task_superplm_round_trips_through_its_checkpoint(tmp_path):
    from autotinybert.checkpoint import load_supernet, save_supernet

    model, *_ = _superplm(tmp_path, depth_order="spaced")
    save_supernet(model, tmp_path / "ckpt")
    loaded = load_supernet(tmp_path / "ckpt")
    assert type(loaded).__name__ == "SuperBertForSequenceClassification"
    assert loaded.config.depth_layers == model.config.depth_layers
    inputs = torch.tensor([[2, 7, 9, 3]])
    arch = Arch(1, 20, 21, 4, 12)
    for m in (model, loaded):
        m.set_arch(arch)
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs).logits, model(inputs).logits)


def test_validation_rows_are_disjoint_from_the_training_rows_and_from_dev(tmp_path):
    task, data, _ = _task_data(tmp_path, validation=5)
    train, validation = {e.guid for e in data.train.examples}, {e.guid for e in data.validation.examples}
    assert validation and not train & validation
    assert all(g.startswith("train.tsv:") for g in validation)  # carved from train, never from dev
    assert not validation & {e.guid for e in data.dev["dev"].examples}
    # The same rows whatever the training budget: selection never depends on it.
    budget = finetune.load_task_data(task, tmp_path / "glue_data", test=False,
                                     settings=FinetuneSettings(validation_examples=5, max_train_examples=3))
    assert {e.guid for e in budget.validation.examples} == validation
    assert {e.guid for e in budget.train.examples} <= train


def test_carving_more_than_a_tenth_of_train_takes_a_tenth(tmp_path):
    task, data, _ = _task_data(tmp_path, validation=1000)
    assert len(data.validation.examples) == (len(data.train.examples) + len(data.validation.examples)) // 10


def _train(model, task, data, ft, tokenizer, out, settings=None):
    teacher = finetune.TeacherLogits.record(model, finetune.train_features(task, tokenizer, data.train, ft), 0, ft)
    settings = settings or TaskSuperPLMSettings(save_every=2, random_sub_models=1)
    return task_supernet.train(model, tokenizer, task, data, teacher, ft, settings, out)


def test_training_moves_every_sub_model_and_a_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    model, _, _, task, data, ft, tokenizer = _superplm(tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summary = _train(model, task, data, ft, tokenizer, tmp_path / "a")
    assert summary["steps"] == 4
    assert not torch.equal(model.classifier.weight, before["classifier.weight"])

    interrupted, *_ = _superplm(tmp_path / "b")
    step_archs = task_supernet._step_archs

    def stop_at_step_1(space, settings, seed, step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return step_archs(space, settings, seed, step)

    monkeypatch.setattr(task_supernet, "_step_archs", stop_at_step_1)
    with pytest.raises(Preempted):
        _train(interrupted, task, data, ft, tokenizer, tmp_path / "b-run")
    monkeypatch.setattr(task_supernet, "_step_archs", step_archs)
    resumed, *_ = _superplm(tmp_path / "c")
    _train(resumed, task, data, ft, tokenizer, tmp_path / "b-run")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, msg=name)


def test_recorded_teacher_logits_give_the_live_teachers_loss(tmp_path):
    model, _, _, task, data, ft, tokenizer = _superplm(tmp_path)
    features = finetune.train_features(task, tokenizer, data.train, ft)
    recorded = finetune.TeacherLogits.record(model, features, 0, ft)
    rows = [3, 0, 5]
    batch = finetune.collate([features[i] for i in rows], 0)
    with torch.no_grad():
        live = finetune.head_outputs(model.eval(), batch)
    torch.testing.assert_close(recorded.rows(rows)[0], live[0], atol=1e-5, rtol=1e-5)
    recorded.save(tmp_path / "logits.safetensors")
    torch.testing.assert_close(finetune.TeacherLogits.load(tmp_path / "logits.safetensors").outputs[0],
                               recorded.outputs[0])


def test_finetuning_runs_on_the_device_it_is_given(tmp_path, monkeypatch):
    """The model is moved to settings.device and every batch follows it (CPU here; cuda on a GPU)."""
    model, _, _, task, data, ft, tokenizer = _superplm(tmp_path)
    student = extract(model, Arch(2, 28, 29, 4, 24))
    moved, seen = [], []
    original_to = student.to

    def spy_to(*args, **kwargs):
        moved.append(args[0] if args else kwargs.get("device"))
        return original_to(*args, **kwargs)

    forward = finetune.head_outputs

    def spy_forward(m, batch):
        seen.append({v.device.type for v in batch.values()})
        return forward(m, batch)

    monkeypatch.setattr(student, "to", spy_to)
    monkeypatch.setattr(finetune, "head_outputs", spy_forward)
    finetune.finetune_model(student, tokenizer, task, data, dataclasses.replace(ft, device="cpu"))
    assert "cpu" in moved
    assert seen and all(devices == {"cpu"} for devices in seen)


# --- the final recipe's hidden-state term ----------------------------------------------------------
def test_layer_map_is_uniform_and_ends_at_the_teachers_last_layer():
    from autotinybert.tasks.distill import layer_map

    assert layer_map(4, 6) == [(0, 0), (1, 2), (2, 3), (3, 5), (4, 6)]
    assert layer_map(3, 3) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert layer_map(1, 6) == [(0, 0), (1, 6)]
    # A slice of a SuperPLM as deep as the teacher: each layer to the one it was sliced from.
    assert layer_map(4, 6, {"of": 6, "kept": [0, 2, 3, 5]}) == [(0, 0), (1, 1), (2, 3), (3, 4), (4, 6)]
    assert layer_map(4, 12, {"of": 6, "kept": [0, 2, 3, 5]}) == layer_map(4, 12)  # another teacher: uniform


def test_an_exported_model_names_the_superplm_layers_it_keeps(tmp_path):
    model, *_ = _superplm(tmp_path, depth_order="spaced")
    exported = extract(model, Arch(2, 28, 29, 4, 24))
    assert exported.config.superplm_layers == {"of": 3, "kept": [0, 2]}
    exported.save_pretrained(tmp_path / "exported")
    assert json.loads((tmp_path / "exported" / "config.json").read_text())["superplm_layers"]["kept"] == [0, 2]


def _hidden_states(model, batch):
    with torch.no_grad():
        return model.eval()(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True).hidden_states


def test_the_fitted_projection_maps_a_reordered_copy_onto_the_teacher(tmp_path):
    """The task SuperPLM's largest sub-model is the teacher with its hidden channels reordered: the
    least-squares projection recovers that order, so the term starts at zero (a random one does not)."""
    from transformers import AutoModelForSequenceClassification

    from autotinybert.tasks.distill import HiddenStateDistillation

    model, _, source, task, data, ft, tokenizer = _superplm(tmp_path)
    teacher = AutoModelForSequenceClassification.from_pretrained(source)
    student = extract(model, Arch(3, 36, 37, 4, 36))
    batch = finetune.collate(finetune.train_features(task, tokenizer, data.train, ft)[:8], 0)
    pair = (_hidden_states(student, batch), _hidden_states(teacher, batch), batch["attention_mask"])
    distiller = HiddenStateDistillation.between(student, teacher)
    unfitted = distiller.loss(*pair).item()
    distiller.fit([pair])
    assert distiller.loss(*pair).item() < 1e-8 < 1e-2 < unfitted
    order = distiller.projection.weight.abs().argmax(dim=1)   # teacher channel i <- student channel order[i]
    assert sorted(order.tolist()) == list(range(36)) and order.tolist() != list(range(36))


def _distilled(tmp_path, kd_hidden: float, store=None, steps: int = 12, lr: float = 2e-3):
    from transformers import AutoModelForSequenceClassification

    model, _, source, task, data, ft, tokenizer = _superplm(tmp_path)
    teacher = AutoModelForSequenceClassification.from_pretrained(source)
    student = extract(model, Arch(2, 28, 29, 4, 24))
    if steps:  # 0: the sliced student as extracted
        settings = dataclasses.replace(ft, max_steps=steps, learning_rate=lr, kd_hidden=kd_hidden, seed=1)
        finetune.finetune_model(student, tokenizer, task, data, settings, teacher=teacher, store=store)
    return student, teacher, finetune.collate(finetune.train_features(task, tokenizer, data.train, ft), 0)


def test_the_hidden_state_term_pulls_the_student_towards_the_teachers_layers(tmp_path):
    from autotinybert.tasks.distill import HiddenStateDistillation

    def distance(student, teacher, batch):
        pair = (_hidden_states(student, batch), _hidden_states(teacher, batch), batch["attention_mask"])
        distiller = HiddenStateDistillation.between(student, teacher)
        distiller.fit([pair])
        return distiller.loss(*pair).item()

    sliced = distance(*_distilled(tmp_path / "start", 0.0, steps=0))
    logits_only = distance(*_distilled(tmp_path / "a", 0.0, steps=40, lr=1e-2))
    with_hidden = distance(*_distilled(tmp_path / "b", 5.0, steps=40, lr=1e-2))
    assert with_hidden < sliced < logits_only and with_hidden < 0.5 * logits_only


def test_a_resumed_hidden_state_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    """The projection trains and is checkpointed with the student; the saved model is the student alone."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    _distilled(tmp_path / "a", 1.0, finetune.RunStore(tmp_path / "a-run"))
    saved = interrupt_after_first_checkpoint(monkeypatch, finetune.RunStore)
    with pytest.raises(KeyboardInterrupt):
        _distilled(tmp_path / "b", 1.0, finetune.RunStore(tmp_path / "b-run"))
    monkeypatch.undo()
    _distilled(tmp_path / "c", 1.0, finetune.RunStore(tmp_path / "b-run"))
    assert saved == [1]
    # The last checkpoints (the kept best is an early one on these few rows) hold student and projection.
    last = {run: load_file(next((tmp_path / run / "checkpoint").glob("step-*")) / "model.safetensors")
            for run in ("a-run", "b-run")}
    assert any(key.startswith("hidden_distillation.projection") for key in last["a-run"])
    for name, value in last["a-run"].items():
        torch.testing.assert_close(last["b-run"][name], value, rtol=0, atol=0, msg=name)
    with safe_open(tmp_path / "b-run" / "model" / "model.safetensors", "pt") as saved_model:
        assert not any("hidden_distillation" in key or "projection" in key for key in saved_model.keys())


# --- the final recipe's teacher-labelled augmentation --------------------------------------------
def test_perturbed_copies_replace_a_seeded_share_of_ordinary_tokens_with_training_tokens():
    from autotinybert.tasks.augment import perturbed_copies

    features = [{"input_ids": [2] + [10 + (i * 7 + j) % 40 for j in range(30)] + [3], "labels": i % 2} for i in range(40)]
    copies = perturbed_copies(features, 3, 0.25, seed=5, special_ids={2, 3})
    assert len(copies) == 120 and copies == perturbed_copies(features, 3, 0.25, seed=5, special_ids={2, 3})
    assert copies != perturbed_copies(features, 3, 0.25, seed=6, special_ids={2, 3})
    seen = {t for f in features for t in f["input_ids"]}
    changed = total = 0
    for index, copy in enumerate(copies):
        original = features[index // 3]["input_ids"]
        assert len(copy["input_ids"]) == len(original) and {copy["input_ids"][0], copy["input_ids"][-1]} == {2, 3}
        assert set(copy["input_ids"]) <= seen
        changed += sum(a != b for a, b in zip(copy["input_ids"][1:-1], original[1:-1]))
        total += len(original) - 2
    assert 0.18 < changed / total < 0.26  # a replacement may draw the same token (1 in 40 here)
    assert features[0]["input_ids"][1] == 10  # the originals are left as they were


def test_augmented_rows_carry_the_teachers_labels(tmp_path, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    from autotinybert.tasks import augment

    model, _, source, task, data, ft, tokenizer = _superplm(tmp_path)
    teacher = AutoModelForSequenceClassification.from_pretrained(source).eval()
    relabelled = []
    original_relabel = augment.relabel

    def spy(features, labels):
        original_relabel(features, labels)
        relabelled.append([dict(f) for f in features])

    monkeypatch.setattr(augment, "relabel", spy)
    settings = dataclasses.replace(ft, augment_copies=2, max_steps=2)
    result = finetune.finetune_model(extract(model, Arch(2, 28, 29, 4, 24)), tokenizer, task, data, settings,
                                     teacher=teacher)
    rows = len(data.train.examples)
    assert result.train_features == 3 * rows and len(relabelled[0]) == 2 * rows
    answers = finetune.glue_predictions(task, finetune.predict_features(teacher, relabelled[0], 0, 8, False))
    assert [f["labels"] for f in relabelled[0]] == answers
    originals = finetune.train_features(task, tokenizer, data.train, settings)
    assert any(f["input_ids"] != originals[i // 2]["input_ids"] for i, f in enumerate(relabelled[0]))


def _task_route_config(tmp_path):
    """The tiny develop config of the task route: a random tiny BERT source over the fixtures' words."""
    from develop_fixtures import NEGATIVE, POSITIVE, SENTENCES, tiny_config
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = sorted({w for s in SENTENCES for w in s.split()} | set(POSITIVE) | set(NEGATIVE) | {"day"})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        source = BertModel(BertConfig(vocab_size=len(tokens), hidden_size=36, num_hidden_layers=3, num_attention_heads=3,
                                      intermediate_size=37, max_position_embeddings=40))
    source.save_pretrained(tmp_path / "source")
    BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}).save_pretrained(tmp_path / "source")
    config = tiny_config(tmp_path / "fixtures")
    for key in ("space", "vocab_size"):
        config["pretrain"].pop(key)
    config["pretrain"]["init_from"] = str(tmp_path / "source")
    config["task"] = {"enabled": True, "calibration_examples": 8, "random_sub_models": 1, "superplm_max_steps": 3,
                      "save_every": 2}
    config["search"].update(evaluator="task", rerank=1, ft_max_steps=2, ft_batch_size=4)
    config["finetune"]["validation_examples"] = 2
    return config


def test_develop_runs_the_task_route_end_to_end(tmp_path):
    """task.enabled: the source fine-tuned on the task is the teacher, its task SuperPLM is searched
    on the carved validation rows, the winner is trained by task KD and scored on dev. With
    latency.form auto the search times the form chosen for it (`_assert_searched_on_the_chosen_form`)."""
    from autotinybert.develop import develop, validate_config

    config = _task_route_config(tmp_path)
    config["latency"].update(form="auto")
    config["search"].update(verify=1)
    config["extract"].update(onnx=True)
    manifest = develop(validate_config(config), tmp_path / "run", log=lambda _: None)
    run = tmp_path / "run"
    _assert_searched_on_the_chosen_form(manifest, run)
    assert json.loads((run / "pretrain" / "config.json").read_text())["architectures"] == \
        ["SuperBertForSequenceClassification"]
    search = json.loads((run / "search" / "results.json").read_text())
    assert search["evaluator"].startswith("task:sst2:") and ":validation=2:" in search["evaluator"]
    assert any("rescored" in v for t in search["targets"] for v in t["history"])  # the shortlist was re-ranked
    for target, model in manifest["stages"]["further_train"]["outputs"]["models"].items():
        assert json.loads((Path(model["path"]) / "config.json").read_text())["architectures"][0].endswith(
            "ForSequenceClassification")
        record = json.loads((Path(model["run"]) / "sst2" / "results.json").read_text())
        assert record["validation_examples"] == 2 and record["validation_score"] is not None
    assert set(manifest["stages"]["finetune"]["outputs"]["runs"]) == {*manifest["stages"]["search"]["outputs"]["best"],
                                                                      "source"}
    assert (run / "report" / "summary.md").is_file()
    # A changed task option redoes the task SuperPLM from a fresh start (never a stale one); the final
    # recipe's hidden-state term and augmentation reach its training (and only its).
    config["task"].update(depth_order="first", kd_hidden=1.0, augment_copies=1)
    manifest = develop(validate_config(config), run, log=lambda _: None)
    assert json.loads((run / "pretrain_start" / "config.json").read_text())["depth_order"] == "first"
    assert json.loads((run / "pretrain" / "config.json").read_text())["depth_layers"]["2"] == [0, 1]
    for model in manifest["stages"]["further_train"]["outputs"]["models"].values():
        record = json.loads((Path(model["run"]) / "sst2" / "results.json").read_text())
        assert record["train_features"] == 2 * record["train_examples"]
        assert yaml.safe_load((Path(model["run"]) / "config.yaml").read_text())["kd_hidden"] == 1.0
    teacher = json.loads((run / "teacher" / "sst2" / "results.json").read_text())
    assert teacher["train_features"] == teacher["train_examples"]


def _assert_searched_on_the_chosen_form(manifest: dict, run: Path) -> None:
    """latency.form auto: every deployed form was profiled, the teacher scored in each on the carved
    rows, and the search, its verification and the extraction's timing all used the chosen form: the
    fastest (by the largest architecture's predicted latency) whose teacher score stays within
    finetune.form_tolerance (0.5) of fp32."""
    stages = manifest["stages"]
    forms = ("torch", "onnxruntime-opt", "onnxruntime-opt-int8")
    predictors = stages["latency"]["outputs"]["predictors"]
    assert set(predictors) == set(forms)
    assert {json.loads(Path(p).read_text())["fingerprint"]["quantize"] for p in predictors.values()} == {"none", "int8"}
    choice = json.loads((run / "search" / "form.json").read_text())
    assert set(choice["scores"]) == set(forms) and set(choice["reference_ms"]) == set(forms)
    floor = max(choice["scores"]["torch"], choice["scores"]["onnxruntime-opt"]) - 0.5
    eligible = {f: ms for f, ms in choice["reference_ms"].items() if choice["scores"][f] >= floor}
    assert choice["form"] == min(eligible, key=eligible.get)
    assert stages["search"]["outputs"]["predictor"] == predictors[choice["form"]]
    assert json.loads((run / "search" / "verify.json").read_text())["form"] == choice["form"]
    for model in stages["extract"]["outputs"]["models"].values():
        assert json.loads((Path(model["path"]) / "latency.json").read_text())["form"] == choice["form"]
    assert f"Searched in form **{choice['form']}**" in (run / "report" / "summary.md").read_text()


def test_the_task_evaluator_scores_the_carved_rows_and_never_reads_dev(tmp_path):
    from autotinybert.checkpoint import save_supernet
    from autotinybert.evaluators import TaskEvaluator

    model, *_ = _superplm(tmp_path)
    save_supernet(model, tmp_path / "superplm")
    tiny_tokenizer().save_pretrained(tmp_path / "superplm")
    evaluator = TaskEvaluator(tmp_path / "superplm", "sst2", tmp_path / "glue_data",
                              settings=FinetuneSettings(validation_examples=5))
    scored = {e.guid for e in evaluator.data.validation.examples}
    assert scored and not scored & {e.guid for e in evaluator.data.train.examples}
    assert all(split is evaluator.data.validation for split in evaluator.data.dev.values())  # dev replaced
    assert len(evaluator.labels) == len(scored)
    arch = Arch(2, 28, 29, 4, 24)
    value = evaluator(arch)
    model.set_arch(arch)
    predictions = task_supernet.logits_of(model, [finetune.collate(evaluator.validation, 0)]).argmax(-1)
    assert value == pytest.approx(100 * float((predictions == torch.tensor(evaluator.labels)).float().mean()))


def test_rerank_picks_the_best_after_rescoring_among_the_leaders():
    from autotinybert.search import Target, TargetResult, rerank

    visits = [{"arch": a, "fitness": f, "latency_ms": 1.0} for a, f in
              (("L1-H8-F8-A1-Q8", 90), ("L2-H8-F8-A1-Q8", 80), ("L1-H8-F8-A1-Q8", 90), ("L3-H8-F8-A1-Q8", 70))]
    result = TargetResult(Target(1.0), (0.9, 1.0), 4, visits)
    assert [v["arch"] for v in result.leaders(2)] == ["L1-H8-F8-A1-Q8", "L2-H8-F8-A1-Q8"]  # distinct, fittest first
    calls = []

    def after_retraining(arch):
        calls.append(str(arch))
        return {"L1-H8-F8-A1-Q8": 60.0, "L2-H8-F8-A1-Q8": 75.0}[str(arch)]

    rerank([result], after_retraining, 2)
    assert sorted(calls) == ["L1-H8-F8-A1-Q8", "L2-H8-F8-A1-Q8"]  # each leader once, the rest never
    assert result.best["arch"] == "L2-H8-F8-A1-Q8"


def test_cli_search_with_the_task_evaluator_and_rerank(tmp_path, capsys):
    """`search --evaluator task --rerank 2`: fitness from the carved rows, the shortlist re-scored
    after a short task-KD retrain, best.json the re-ranked winner."""
    from test_search import _toy_predictor

    from autotinybert.checkpoint import save_supernet
    from autotinybert.cli import main

    model, _, source, *_ = _superplm(tmp_path)
    save_supernet(model, tmp_path / "superplm")
    tiny_tokenizer().save_pretrained(tmp_path / "superplm")
    space = model.config.search_space
    predictor = _toy_predictor(tmp_path / "pred.json", space)
    argv = ["search", "--supernet", str(tmp_path / "superplm"), "--predictor", str(tmp_path / "pred.json"),
            "--target-ms", f"{predictor.predict(Arch(2, 24, 25, 4, 20)):.4f}", "--window", "0.5", "1.0",
            "--evaluator", "task", "--task", "sst2", "--data-dir", str(tmp_path / "glue_data"),
            "--ft-validation-examples", "2", "--ft-max-steps", "2", "--ft-batch-size", "4", "--rerank", "2",
            "--rerank-teacher", str(source), "--method", "random", "--generation-size", "4", "--generations", "1",
            "--grid-step-hidden", "4", "--grid-step-ffn", "4", "--out", str(tmp_path / "search"), "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "search" / "results.json").read_text())
    assert results["evaluator"].startswith("task:sst2:") and results["metric"] == "task score"
    rescored = [v for v in results["targets"][0]["history"] if "rescored" in v]
    assert 1 <= len({v["arch"] for v in rescored}) <= 2
    best = json.loads((tmp_path / "search" / "best.json").read_text())[0]
    assert best["arch"] == max(rescored, key=lambda v: (v["rescored"], -v["latency_ms"]))["arch"]
    # --rerank belongs to the task evaluator: with another it is refused before anything is written.
    proxy = [a if a != "task" else "proxy" for a in argv]
    proxy[proxy.index("--out") + 1] = str(tmp_path / "other")
    assert main(proxy) == 2 and not (tmp_path / "other").exists()


def test_cli_search_correlate_reports_the_task_fitness_against_the_finetuned_score(tmp_path, capsys):
    """`search correlate --fitness task` on a task SuperPLM: Spearman, Kendall and the top-1 regret of
    the inherited score against the fine-tuned one, every row, one state file per evaluator."""
    from autotinybert.checkpoint import save_supernet
    from autotinybert.cli import main

    model, *_ = _superplm(tmp_path)
    save_supernet(model, tmp_path / "superplm")
    tiny_tokenizer().save_pretrained(tmp_path / "superplm")
    out = tmp_path / "correlate"
    argv = ["search", "correlate", "--supernet", str(tmp_path / "superplm"), "--fitness", "task", "--samples", "4",
            "--task", "sst2", "--data-dir", str(tmp_path / "glue_data"), "--ft-validation-examples", "2",
            "--ft-max-steps", "2", "--ft-batch-size", "4", "--grid-step-hidden", "4", "--grid-step-ffn", "4",
            "--out", str(out), "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    summary = json.loads((out / "correlate.json").read_text())
    assert list(summary["fitness"]) == ["task"] and len(summary["rows"]) == 4
    task = summary["fitness"]["task"]
    assert task["pick"] in [r["arch"] for r in summary["rows"]] and task["top1_regret"] >= 0
    assert all(isinstance(r["task"], float) and isinstance(r["finetune"], float) for r in summary["rows"])
    assert "task: Spearman" in printed and "top-1 regret" in printed
    assert {p.name for p in out.glob("*-state.json")} == {"task-state.json", "finetune-state.json"}


def test_a_regression_task_builds_trains_and_scores(tmp_path):
    """STS-B: one output, MSE against the teacher's scores; the evaluator scores Pearson/Spearman."""
    from autotinybert.checkpoint import save_supernet
    from autotinybert.evaluators import TaskEvaluator

    model, summary, _, task, data, ft, tokenizer = _superplm(tmp_path, task_name="stsb", depth_order="importance")
    assert summary["max_abs_diff"] < 1e-5 and len(summary["layer_scores"]) == 3
    assert model.classifier.out_features == 1
    _train(model, task, data, ft, tokenizer, tmp_path / "run")
    save_supernet(model, tmp_path / "superplm")
    tokenizer.save_pretrained(tmp_path / "superplm")
    evaluator = TaskEvaluator(tmp_path / "superplm", "stsb", tmp_path / "glue_data",
                              settings=FinetuneSettings(validation_examples=1))
    value = evaluator(Arch(2, 28, 29, 4, 24))
    assert value == value  # a number (correlations of a single row are undefined, scored as such)
