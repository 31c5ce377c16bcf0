"""Deployed forms: ONNX Runtime's transformer fusions per model type, int8 (ONNX Runtime and torch),
extract's forms and their agreement, and `evaluate` through an ONNX Runtime session (issue 14)."""

from __future__ import annotations

import json

import pytest
import torch

from autotinybert.deploy import OnnxTaskModel, fusion_counts, onnx_forms, quantize_torch
from autotinybert.errors import UserError
from autotinybert.export import _model_output, export_checkpoint, int8_agreement, random_inputs
from autotinybert.latency import build_model
from autotinybert.space import Arch
from conftest import TINY_KD, TINY_VOCAB, randomise_parameters, tiny_supernet

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime.transformers.optimizer")

STOCK = Arch(2, 36, 37, 4, 36)        # BertModel (heads of 9)
OURS = Arch(2, 36, 37, 4, 24)         # AutoTinyBertModel: qkv_size != hidden_size (heads of 6)


def _encoder(arch: Arch):
    model = build_model(arch, vocab_size=TINY_VOCAB, seq_len=40)
    randomise_parameters(model, seed=1)
    return model.eval()


@pytest.mark.parametrize("arch, fusable, fused", [
    (STOCK, True, {"Attention": 2, "EmbedLayerNormalization": 1, "SkipLayerNormalization": 4, "BiasGelu": 2}),
    (OURS, True, {"Attention": 2, "EmbedLayerNormalization": 1, "SkipLayerNormalization": 4, "BiasGelu": 2}),
    (STOCK, False, {"SkipLayerNormalization": 4, "BiasGelu": 2}),  # transformers' SDPA graph: no Attention fusion
], ids=["bert-eager-export", "autotinybert", "bert-sdpa-export"])
def test_which_fusions_apply_per_model_type(tmp_path, arch, fusable, fused):
    model = _encoder(arch)
    paths = onnx_forms(model, tmp_path, ("int8",), fusable=fusable)
    counts = fusion_counts(paths["optimized"])
    for op, n in fused.items():
        assert counts.get(op) == n, counts
    if not fusable:
        assert "Attention" not in counts and "EmbedLayerNormalization" not in counts
    # Fused or not, the optimised graph computes the model's function (padded, mixed segments).
    inputs = random_inputs(TINY_VOCAB, batch=3, seq_len=19, seed=2)
    reference = _model_output(model, inputs)
    for form in ("fp32", "optimized"):
        out = OnnxTaskModel(paths[form])(**inputs).output
        torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4, msg=lambda m: f"{form}: {m}")
    int8 = OnnxTaskModel(paths["int8"])(**inputs).output
    assert "MatMulInteger" in fusion_counts(paths["int8"]) or "DynamicQuantizeMatMul" in fusion_counts(paths["int8"]) \
        or "QAttention" in fusion_counts(paths["int8"])
    assert int8_agreement(reference, int8)["relative_mean_diff"] < 0.1


def test_torch_int8_is_close_and_the_model_is_untouched():
    model = _encoder(OURS)
    inputs = random_inputs(TINY_VOCAB, seed=3)
    reference = _model_output(model, inputs)
    quantized = quantize_torch(model)
    assert type(quantized.encoder.layer[0].attention.self.query).__name__ == "Linear"  # dynamic qlinear module
    assert int8_agreement(reference, _model_output(quantized, inputs))["relative_mean_diff"] < 0.1
    assert isinstance(model.encoder.layer[0].attention.self.query, torch.nn.Linear)  # a copy was quantised
    torch.testing.assert_close(_model_output(model, inputs), reference)


def test_extract_writes_verified_forms_and_reports_int8_agreement(tmp_path):
    supernet = tiny_supernet(TINY_KD, seed=0)
    supernet.save_pretrained(tmp_path / "super")
    arch = Arch(2, 33, 29, 4, 24)
    summary = export_checkpoint(tmp_path / "super", arch, tmp_path / "out", onnx_int8=True, isolated=False)
    assert set(summary["onnx_forms"]) == {"fp32", "optimized", "int8"}
    assert summary["onnx_forms"]["optimized"]["operators"].get("Attention") == 2
    assert summary["max_abs_diff"]["onnx_optimized"] <= 1e-4 and summary["max_abs_diff"]["onnx"] <= 1e-4
    for engine in ("onnxruntime", "torch"):
        agreement = summary["int8_agreement"][engine]
        assert agreement["relative_mean_diff"] < 0.1 and agreement["argmax_agreement"] > 0.5, agreement
    for name in ("model.onnx", "model.opt.onnx", "model.opt.int8.onnx"):
        assert (tmp_path / "out" / name).is_file()
    assert json.loads((tmp_path / "out" / "results.json").read_text())["int8_agreement"] == summary["int8_agreement"]


def test_evaluate_scores_an_onnx_model_like_the_torch_one(tmp_path):
    from autotinybert import settings as S
    from autotinybert.tasks import finetune as ft
    from autotinybert.tasks.run import run_evaluate
    from tasks_fixtures import glue_layout, tiny_encoder, tiny_tokenizer

    task = ft.resolve_task("sst2")
    model = ft.build_task_model(tiny_encoder(), task).eval()
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    glue = glue_layout(tmp_path)
    data = S.TaskDataSettings(tasks=["sst2"], data_dir=glue)
    settings = S.FinetuneSettings(progress=False)

    def scores(**command):
        results = run_evaluate(S.EvaluateCommand(test=False, **command), data, settings)
        return results["tasks"]["sst2"]

    torch_scores = scores(model=tmp_path / "model")
    fp32 = scores(model=tmp_path / "model", onnx="fp32", out=tmp_path / "eval-fp32")
    int8 = scores(model=tmp_path / "model", onnx="int8")
    assert torch_scores["form"] == "torch" and fp32["form"] == "onnx-fp32" and int8["form"] == "onnx-int8"
    assert fp32["scores"] == torch_scores["scores"]
    assert 0.0 <= int8["score"] <= 100.0
    exported = tmp_path / "eval-fp32" / "sst2" / "onnx" / "model.onnx"
    assert exported.is_file()
    # An .onnx file as --model: the tokenizer comes from --tokenizer (or the file's folder).
    direct = scores(model=exported, tokenizer=tmp_path / "model")
    assert direct["scores"] == torch_scores["scores"] and direct["form"] == "onnx:model.onnx"
    with pytest.raises(UserError, match="needs 3"):
        run_evaluate(S.EvaluateCommand(model=exported, tokenizer=tmp_path / "model", test=False),
                     S.TaskDataSettings(tasks=["mnli"], data_dir=glue), settings)
