"""Equivalence is the specification: sliced SuperPLM == extracted == reloaded == isolated == ONNX."""

import json
import random

import pytest
import torch
from transformers import AutoModel, AutoModelForMaskedLM, BertForMaskedLM, BertModel

from autotinybert import extract, verify_export
from autotinybert.export import _model_output, export_onnx, random_inputs, save_export
from autotinybert.hf import AutoTinyBertForMaskedLM, AutoTinyBertModel
from autotinybert.space import Arch, SearchSpace, released
from conftest import TINY_KD, TINY_MLM, TINY_VOCAB, tiny_supernet
from slicing_reference import bert_state, reference_forward, reference_state_dict

TOLERANCE = 1e-5


def _assert_equivalent(report: dict[str, float]) -> None:
    assert report and all(value <= TOLERANCE for value in report.values()), report


def _reference(supernet, arch, inputs, encoder_only=False):
    supernet.set_arch(arch)
    with torch.no_grad():
        if encoder_only:
            return supernet.bert(**inputs).last_hidden_state
        return supernet(**inputs, masked_only=False).logits


def _expected(supernet, arch, inputs, encoder_only=False) -> dict[str, torch.Tensor]:
    """Outputs of the independent explicit-indexing reference (tests/slicing_reference.py)."""
    out = reference_forward(reference_state_dict(supernet, arch), arch.num_attention_heads, inputs)
    if encoder_only:
        return {"last_hidden_state": out["last_hidden_state"], "pooler_output": out["pooler_output"]}
    return {"logits": out["logits"]}


def _assert_outputs(model, inputs, expected: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        out = model(**inputs)
    for key, value in expected.items():
        torch.testing.assert_close(getattr(out, key), value, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("space", [TINY_MLM, TINY_KD], ids=["mlm", "kd"])
def test_extracted_model_holds_the_reference_weights_and_outputs(space):
    for seed in range(3):
        supernet = tiny_supernet(space, seed=seed)
        rng = random.Random(seed)
        for _ in range(4):
            arch = space.sample(rng)
            reference = reference_state_dict(supernet, arch)
            inputs = random_inputs(TINY_VOCAB, batch=3, seq_len=11 + seed, seed=seed)
            for encoder_only in (False, True):
                model = extract(supernet, arch, encoder_only=encoder_only)
                # weight by weight: the extracted tensors are the explicitly indexed ones
                expected_state = bert_state(reference, encoder_only)
                state = model.state_dict()
                assert sorted(state) == sorted(expected_state)
                for key, value in expected_state.items():
                    assert torch.equal(state[key], value), (str(arch), key)
                _assert_outputs(model, inputs, _expected(supernet, arch, inputs, encoder_only))
                # and the sliced supernet agrees with its export
                torch.testing.assert_close(_model_output(model, inputs), _reference(supernet, arch, inputs, encoder_only))


@pytest.mark.parametrize("mode, wrong", [("mlm", "last_heads"), ("kd", "kd_last_dims"), ("kd", "kd_contiguous"),
                                         ("kd", "attention.output.dense")])
def test_extracted_weights_are_not_those_of_a_wrong_rule(mode, wrong):
    """The weight-by-weight comparison above would notice a wrong head rule."""
    space = TINY_MLM if mode == "mlm" else TINY_KD
    supernet = tiny_supernet(space)
    arch = Arch(2, 32, 25, 2, 18) if mode == "mlm" else Arch(2, 25, 29, 4, 16)
    state = extract(supernet, arch).state_dict()
    wrong_state = bert_state(reference_state_dict(supernet, arch, wrong=wrong))
    assert any(not torch.equal(state[key], value) for key, value in wrong_state.items())


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
            auto = AutoModel if encoder_only else AutoModelForMaskedLM
            inputs = random_inputs(TINY_VOCAB, batch=3, seq_len=13, seed=index)
            _assert_outputs(auto.from_pretrained(out, trust_remote_code=True).eval(), inputs,
                            _expected(supernet, arch, inputs, encoder_only))


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
    extract(supernet, arch, encoder_only=True).save_pretrained(tmp_path)  # the README's route
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


# A fresh Python that cannot import autotinybert: the only code it may use is what
# save_pretrained wrote next to the weights (as on a machine that never installed autotinybert).
_WITHOUT_AUTOTINYBERT = r"""
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "autotinybert":
            raise ImportError("autotinybert is deliberately unavailable in this process")
sys.meta_path.insert(0, _Block())
import torch, transformers
from safetensors.torch import load_file, save_file
mlm_dir, encoder_dir, resaved_dir, inputs_file, output_file = sys.argv[1:6]
inputs = load_file(inputs_file)
out = {}
with torch.no_grad():
    mlm = transformers.AutoModelForMaskedLM.from_pretrained(mlm_dir, trust_remote_code=True).eval()
    out["logits"] = mlm(**inputs).logits
    # re-saved where autotinybert is absent (e.g. after fine-tuning there): still self-contained
    mlm.save_pretrained(resaved_dir)
    again = transformers.AutoModelForMaskedLM.from_pretrained(resaved_dir, trust_remote_code=True).eval()
    out["resaved_logits"] = again(**inputs).logits
    encoder = transformers.AutoModel.from_pretrained(encoder_dir, trust_remote_code=True).eval()
    result = encoder(**inputs)
    out["last_hidden_state"], out["pooler_output"] = result.last_hidden_state, result.pooler_output
    classifier = transformers.AutoModelForSequenceClassification.from_pretrained(
        encoder_dir, num_labels=3, trust_remote_code=True)
    out["classifier_logits"] = classifier.eval()(**inputs).logits
assert not any(m.split(".")[0] == "autotinybert" for m in sys.modules), "autotinybert was imported"
save_file({k: v.contiguous() for k, v in out.items()}, output_file)
"""


def test_readme_save_pretrained_loads_where_autotinybert_is_not_installed(tmp_path):
    """README: ``sub = extract(model, arch); sub.save_pretrained(path)``, nothing else."""
    space, arch = TINY_KD, Arch(2, 25, 29, 4, 16)  # one subprocess: the slow part
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file, save_file

    supernet = tiny_supernet(space, seed=4)
    assert not arch.is_bert_compatible  # the case that needs modeling files next to the weights
    mlm_dir, encoder_dir = tmp_path / "mlm", tmp_path / "encoder"
    extract(supernet, arch).save_pretrained(mlm_dir)
    extract(supernet, arch, encoder_only=True).save_pretrained(encoder_dir)
    for directory in (mlm_dir, encoder_dir):
        config = json.loads((directory / "config.json").read_text())
        assert config["model_type"] == "autotinybert"
        for module, _ in (entry.split(".") for entry in config["auto_map"].values()):
            assert (directory / f"{module}.py").is_file(), module

    inputs = random_inputs(TINY_VOCAB, batch=3, seq_len=13, seed=2)
    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    env.pop("PYTHONPATH", None)  # with the blocker above: no way to reach autotinybert
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_AUTOTINYBERT, str(mlm_dir), str(encoder_dir), str(tmp_path / "resaved"),
         str(tmp_path / "inputs.safetensors"), str(tmp_path / "out.safetensors")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = load_file(str(tmp_path / "out.safetensors"))
    expected = _expected(supernet, arch, inputs) | _expected(supernet, arch, inputs, encoder_only=True)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, msg=lambda m: f"{key}: {m}")
    torch.testing.assert_close(got["resaved_logits"], expected["logits"])
    assert got["classifier_logits"].shape == (3, 3)
