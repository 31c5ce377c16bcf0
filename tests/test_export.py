"""Equivalence is the specification: sliced SuperPLM == extracted == reloaded == isolated == ONNX."""

import json
import random

import pytest
import torch
from transformers import AutoModel, AutoModelForMaskedLM, BertForMaskedLM, BertModel

from autotinybert import extract, verify_export
from autotinybert.export import export_onnx, random_inputs, save_export
from autotinybert.hf import AutoTinyBertForMaskedLM, AutoTinyBertModel
from autotinybert.space import Arch, SearchSpace, released
from conftest import TINY_KD, TINY_MLM, TINY_VOCAB, tiny_supernet

TOLERANCE = 1e-5


def _assert_equivalent(report: dict[str, float]) -> None:
    assert report and all(value <= TOLERANCE for value in report.values()), report


def _reference(supernet, arch, inputs, encoder_only=False):
    supernet.set_arch(arch)
    with torch.no_grad():
        if encoder_only:
            return supernet.bert(**inputs).last_hidden_state
        return supernet(**inputs, masked_only=False).logits


@pytest.mark.parametrize("space", [TINY_MLM, TINY_KD], ids=["mlm", "kd"])
def test_extracted_equals_sliced_supernet_for_many_random_architectures(space):
    for seed in range(4):
        supernet = tiny_supernet(space, seed=seed)
        rng = random.Random(seed)
        for _ in range(6):
            arch = space.sample(rng)
            inputs = random_inputs(TINY_VOCAB, batch=3, seq_len=11 + seed, seed=seed)
            for encoder_only in (False, True):
                model = extract(supernet, arch, encoder_only=encoder_only)
                with torch.no_grad():
                    out = model(**inputs)
                got = out.last_hidden_state if encoder_only else out.logits
                torch.testing.assert_close(got, _reference(supernet, arch, inputs, encoder_only))


@pytest.mark.parametrize("space, compatible", [(TINY_MLM, Arch(2, 36, 37, 4, 36)), (TINY_KD, Arch(2, 36, 37, 4, 36))],
                         ids=["mlm", "kd"])
def test_stock_bert_whenever_representable(space, compatible):
    supernet = tiny_supernet(space)
    assert type(extract(supernet, compatible)) is BertForMaskedLM
    assert type(extract(supernet, compatible, encoder_only=True)) is BertModel
    narrow = Arch(2, 36, 37, 4, 36 if space.mode == "mlm" else 20)
    narrow = narrow if not narrow.is_bert_compatible else Arch(2, 32, 37, 4, 36)
    assert type(extract(supernet, narrow)) is AutoTinyBertForMaskedLM
    assert type(extract(supernet, narrow, encoder_only=True)) is AutoTinyBertModel


@pytest.mark.parametrize("space", [TINY_MLM, TINY_KD], ids=["mlm", "kd"])
def test_saved_checkpoints_reload_everywhere_with_the_same_outputs(tmp_path, space):
    supernet = tiny_supernet(space, seed=11)
    rng = random.Random(11)
    archs = [Arch(2, 36, 37, 4, 36), space.sample(rng), space.sample(rng)]
    for index, arch in enumerate(archs):
        for encoder_only in (False, True):
            out = tmp_path / f"{index}-{int(encoder_only)}"
            model = extract(supernet, arch, encoder_only=encoder_only)
            save_export(model, out)
            config = json.loads((out / "config.json").read_text())
            if arch.is_bert_compatible:
                assert config["model_type"] == "bert" and "auto_map" not in config
            else:
                assert config["model_type"] == "autotinybert" and config["qkv_size"] == arch.qkv_size
                assert (out / "modeling_autotinybert.py").is_file() and "AutoModelForMaskedLM" in config["auto_map"]
            onnx = export_onnx(model, out / "model.onnx")
            # the subprocess check is slow-ish: once per space, on a non-stock model
            isolated = index == 1 and not encoder_only
            report = verify_export(supernet, arch, out, encoder_only=encoder_only, onnx_path=onnx, isolated=isolated,
                                   seq_len=23, batch=4, seed=index)
            assert set(report) == {"extracted", "reloaded", "onnx"} | ({"isolated"} if isolated else set())
            _assert_equivalent(report)


@pytest.fixture(scope="module")
def paper_supernets():
    """Paper-size SuperPLMs with a 99-token vocabulary (the released shapes, cheaply)."""
    return {mode: tiny_supernet(SearchSpace.paper(mode), seed=1) for mode in ("mlm", "kd")}


@pytest.mark.parametrize("item", released(), ids=lambda r: r.name)
def test_released_architectures_extract_exactly(tmp_path, paper_supernets, item):
    supernet = paper_supernets[item.mode]
    model = extract(supernet, item.arch)
    save_export(model, tmp_path)
    first = item.name in ("S1", "KD-S1")
    onnx = export_onnx(model, tmp_path / "model.onnx") if first else None
    report = verify_export(supernet, item.arch, tmp_path, onnx_path=onnx, isolated=first, seq_len=21)
    _assert_equivalent(report)
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path, trust_remote_code=True)
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in model.parameters())


def test_parameter_count_matches_the_exported_model():
    from autotinybert.space import parameter_count

    supernet = tiny_supernet(TINY_KD)
    arch = Arch(3, 29, 33, 4, 28)
    encoder = extract(supernet, arch, encoder_only=True)
    mlm = extract(supernet, arch)
    assert sum(p.numel() for p in encoder.parameters()) == parameter_count(arch, TINY_VOCAB, 40, pooler=True)
    assert sum(p.numel() for p in mlm.parameters()) == parameter_count(arch, TINY_VOCAB, 40, mlm_head=True)


def test_exported_non_stock_model_serves_downstream_heads(tmp_path):
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    supernet = tiny_supernet(TINY_KD)
    arch = Arch(2, 25, 29, 4, 16)
    save_export(extract(supernet, arch, encoder_only=True), tmp_path)
    inputs = random_inputs(TINY_VOCAB, seed=9)
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=3, trust_remote_code=True)
    labels = torch.tensor([0, 2, 1])
    out = classifier(**inputs, labels=labels)
    assert out.logits.shape == (3, 3) and out.loss.requires_grad
    qa = AutoModelForQuestionAnswering.from_pretrained(tmp_path, trust_remote_code=True)
    out = qa(**inputs, start_positions=torch.tensor([1, 2, 3]), end_positions=torch.tensor([2, 2, 5]))
    assert out.start_logits.shape == inputs["input_ids"].shape and torch.isfinite(out.loss)
    # the encoder inside the task model holds the exported weights
    encoder = AutoModel.from_pretrained(tmp_path, trust_remote_code=True)
    for key, value in encoder.state_dict().items():
        torch.testing.assert_close(classifier.bert.state_dict()[key], value)


def test_randomised_layer_norms_are_really_random():
    supernet = tiny_supernet(TINY_MLM)
    # the equivalence checks above must not be fooled by LayerNorm ones/zeros
    assert supernet.bert.embeddings.LayerNorm.weight.std() > 0.1
    assert supernet.bert.encoder.layer[0].output.LayerNorm.bias.abs().mean() > 0.1
