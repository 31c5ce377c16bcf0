"""``latency bundle``: profile a device that cannot run the project.

Writes the ONNX models of a profile plan (in the requested deployed form) and one standalone
runner (`runner.py`, copied as ``run_bundle.py``) that needs only onnxruntime and numpy. On the
device: ``python run_bundle.py --out profile.jsonl``; back here: ``autotinybert latency fit --data
profile.jsonl``. The records carry the device's fingerprint, so the predictor warns when used
anywhere else (HAT and nn-Meter also measure on the device).
"""

from __future__ import annotations

import dataclasses
import shutil
import warnings
from pathlib import Path
from typing import Any

from ..files import atomic_write_json, atomic_write_text, staged_directory
from ..settings import LatencySettings
from ..space import BERT_BASE, SearchSpace, parameter_count
from . import runner
from .costs import flops
from .profiling import plan_architectures
from .timing import build_model, onnx_form_file

BUNDLE_FORMAT = "autotinybert-latency-bundle"
RUNNER_FILE = "run_bundle.py"
_ROBUST = ("warmup", "repeats", "max_repeats", "tolerance", "noise_limit", "interleave")


def write_bundle(space: SearchSpace | str, samples: int, out: str | Path, settings: LatencySettings = LatencySettings(),
                 *, seed: int = 0, reference: bool = True, overwrite: bool = False, progress: bool = True,
                 arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``out/models/*.onnx`` (BERT-base first when ``reference``, then the plan of ``samples``
    architectures), ``out/plan.json`` and ``out/run_bundle.py``; returns the plan."""
    from tqdm.auto import tqdm

    from ..files import write_stage_config

    space = SearchSpace.load(space) if isinstance(space, (str, Path)) else space
    if settings.engine != "onnxruntime":
        settings = dataclasses.replace(settings, engine="onnxruntime")  # the runner's only engine
    archs = ([(BERT_BASE, True)] if reference else []) + [(a, False) for a in plan_architectures(space, samples, seed)]
    plan: dict[str, Any] = {
        "format": BUNDLE_FORMAT, "version": 1, "form": settings.form, "shape": settings.shape(),
        "timing": {key: getattr(settings, key) for key in _ROBUST}, "vocab_size": settings.vocab_size, "seed": seed,
        "models": [],
    }
    with staged_directory(out, overwrite) as tmp:
        (tmp / "models").mkdir()
        for index, (arch, is_reference) in enumerate(tqdm(archs, desc=f"bundle ({settings.form})", unit="model",
                                                          disable=not progress, dynamic_ncols=True)):
            work = tmp / "work" / str(index)
            model = build_model(arch, settings.vocab_size, settings.seq_len)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                path = onnx_form_file(model, settings, work)
            name = f"models/{index:03d}-{arch}.onnx"
            path.replace(tmp / name)
            shutil.rmtree(work)
            plan["models"].append({
                "arch": str(arch), "file": name, "reference": is_reference, "features": arch.to_dict(),
                "space": space.to_dict(), "flops": flops(arch, settings.batch_size, settings.seq_len),
                "parameters": parameter_count(arch, settings.vocab_size, max(512, settings.seq_len), pooler=True)})
        shutil.rmtree(tmp / "work", ignore_errors=True)
        atomic_write_json(tmp / runner.PLAN_FILE, plan)
        shutil.copyfile(runner.__file__, tmp / RUNNER_FILE)
        atomic_write_text(tmp / "README.txt", _README.format(n=len(archs), form=settings.form))
        if arguments is not None:
            write_stage_config(tmp, arguments)
    return plan


_README = """Latency bundle: {n} ONNX models ({form}) of an autotinybert profile plan.

On the device (needs only Python 3.8+, numpy and onnxruntime):

    pip install onnxruntime numpy
    python run_bundle.py --out profile.jsonl          # --clock cpu with --threads 1 on a busy device; --resume

Then, where autotinybert is installed:

    autotinybert latency fit --data profile.jsonl --out predictor.json
"""

