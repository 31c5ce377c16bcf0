"""The resumable ``latency profile`` stage: which architectures to time, and the JSONL records file."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..files import atomic_write_text
from ..space import BERT_BASE, Arch, SearchSpace
from ..settings import LatencySettings
from .hardware import shape_of
from .timing import DRIFT_ANCHOR, measure_many

_GZIP_MAGIC = b"\x1f\x8b"
# Every promised speed-up divides by BERT-base's latency, so it is timed in up to this many chunks
# spread over the profile and the median kept: one chunk can sit a few percent off the machine's
# typical speed even after the drift anchor's correction (3 % seen in a quiet 60-architecture profile).
REFERENCE_TIMINGS = 3


def plan_architectures(space: SearchSpace, samples: int, seed: int = 0, hidden_bins: int = 4) -> list[Arch]:
    """``samples`` distinct architectures spread over ``space``, deterministic in ``seed``.

    The space's largest and smallest architectures come first: targets are set from their predicted
    latencies ("3× faster than the source", the largest; range fractions between the two), and a
    predictor only extrapolates there otherwise (a demo profile whose slowest sample was 24 ms
    predicted its 47 ms source 10 % fast, so every shipped model overshot its target). The rest is
    stratified over (layers × hidden-size bins) so that small and large models are both covered:
    strata are visited round-robin (in a shuffled order each round); inside a stratum the other
    hyper-parameters are uniform on the grid.
    """
    if samples < 1:
        raise UserError(f"--samples must be >= 1; got {samples}")
    rng = random.Random(seed)
    hidden = list(space.hidden.values())
    bins = [chunk for chunk in np.array_split(np.asarray(hidden), min(hidden_bins, len(hidden))) if len(chunk)]
    strata = [(layers, [int(h) for h in chunk]) for layers in space.layers.values() for chunk in bins]
    planned: list[Arch] = list(dict.fromkeys([space.largest(), space.smallest()]))[:samples]
    seen: set[Arch] = set(planned)
    attempts = 0
    order: list[int] = []
    while len(planned) < samples:
        attempts += 1
        if attempts > 50 * samples + 1000:  # bounded: a tiny space cannot yield more distinct points
            raise UserError(f"the space holds fewer than {samples} distinct architectures; lower --samples")
        if not order:
            order = list(range(len(strata)))
            rng.shuffle(order)
        layers, hidden_choices = strata[order.pop()]
        arch = dataclasses.replace(space.sample(rng), num_hidden_layers=layers, hidden_size=rng.choice(hidden_choices))
        if arch not in seen and space.contains(arch):
            seen.add(arch)
            planned.append(arch)
    return planned


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a profile JSONL file, plain or gzip-compressed (as archived in docs/results/latency-bench/);
    a torn last line (interrupted write) is dropped."""
    path = Path(path)
    try:
        data = path.read_bytes()
        if data[:2] == _GZIP_MAGIC:  # by content, not suffix: `profile` appends plain text whatever the name
            data = gzip.decompress(data)
        lines = data.decode("utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"latency data {path} does not exist; run 'autotinybert latency profile' first") from None
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read latency data {path}: {err}") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            Arch.parse(record["arch"])
            float(record["latency"]["median_ms"])
        except (ValueError, KeyError, TypeError):
            if number == len(lines):
                break  # interrupted while appending; --resume measures it again
            raise UserError(f"{path}:{number} is not a latency record; regenerate it with 'latency profile'") from None
        bad = _bad_timing(record)
        if bad:  # a number read from a file is checked like one typed: log-latency fits and speedups need > 0
            raise UserError(f"{path}:{number} ({record['arch']}) has {bad}; latencies must be positive numbers "
                            "(remeasure with 'latency profile')")
        records.append(record)
    return records


_TIMINGS = (("latency", "median_ms"), ("anchor", "median_ms"), ("paced", "ratio"))  # anchor, paced: drift only


def _bad_timing(record: dict[str, Any]) -> str | None:
    """The first timing of ``record`` that is not a positive finite number, as ``key.field value``."""
    for key, field in _TIMINGS:
        part = record.get(key)
        if part is None and key != "latency":
            continue
        value = part.get(field) if isinstance(part, dict) else part
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            return f"{key}.{field} {value!r}"
    return None


def _append_line(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())  # a crash loses at most the line being written


def profile(space: SearchSpace | str, samples: int, out: str | Path, settings: LatencySettings = LatencySettings(),
            *, seed: int = 0, resume: bool = False, overwrite: bool = False, progress: bool = True,
            arguments: dict[str, Any] | None = None, drift_anchor: bool = True) -> list[dict[str, Any]]:
    """Measure BERT-base (the speedup reference) and ``samples`` planned architectures into ``out``.

    BERT-base is timed `reference_timings` times, in chunks spread from the first to the last
    (records with ``reference`` true and their ``reference_index``); the predictor's reference is
    their median. The first record returned is the first reference timing, the others follow the
    planned architectures.

    One JSON line per measurement, appended and fsynced as it goes. With ``resume`` only
    architectures missing from ``out`` are measured; the plan depends only on (space, samples,
    seed), so a rerun continues the same list. ``overwrite`` measures into the sibling
    ``.NAME.partial`` and replaces ``out`` only when complete (``resume`` continues that one).
    ``drift_anchor``: every chunk also times `timing.DRIFT_ANCHOR` (records carry its median as
    ``anchor``; `fitting.drift_corrected_ms` divides the drift out).
    """
    space = SearchSpace.load(space) if isinstance(space, (str, Path)) else space
    out = Path(out)
    planned = plan_architectures(space, samples, seed)
    references = [_reference_key(i) for i in range(reference_timings(samples, settings.interleave))]
    partial = out.with_name(f".{out.name}.partial")
    target = partial if resume and partial.is_file() else out
    if not resume and out.exists() and out.stat().st_size:
        if not overwrite:
            raise UserError(f"--out {out} already exists; pass --resume to continue it or --overwrite to start again")
        target = partial
        partial.unlink(missing_ok=True)
    done = _check_resumable(target, settings, space) if resume and target.is_file() and target.stat().st_size else {}
    out.parent.mkdir(parents=True, exist_ok=True)
    if arguments is not None and target == out:  # a replacement records its arguments when it replaces
        write_output_config(out, arguments)
    todo = _spread([str(a) for a in planned if str(a) not in done], [key for key in references if key not in done])
    keys = iter(todo)  # `measure_many` hands the records back in the order it was given the architectures
    bar = _progress(len(todo), progress, f"latency ({settings.form})")

    def record_done(record: dict[str, Any]) -> None:
        key = next(keys)
        arch = Arch.parse(record["arch"])
        record.update(reference=key in references, features=arch.to_dict(), space=space.to_dict(), seed=seed)
        if record["reference"]:
            record["reference_index"] = references.index(key)
        _append_line(target, record)
        done[key] = record
        bar.update(1)
        bar.set_postfix_str(f"{arch} {record['latency']['median_ms']:.1f} ms")

    # Interleaved chunks (settings.interleave at a time); each record is appended as its chunk ends.
    measure_many([BERT_BASE if key in references else Arch.parse(key) for key in todo], settings,
                 on_record=record_done, anchor=DRIFT_ANCHOR if drift_anchor else None)
    bar.close()
    if target != out:
        os.replace(target, out)
        if arguments is not None:
            write_output_config(out, arguments)
    return [done[key] for key in references[:1] + [str(a) for a in planned] + references[1:]]


def reference_timings(samples: int, interleave: int) -> int:
    """How many times a profile of ``samples`` times BERT-base: once per chunk, up to `REFERENCE_TIMINGS`."""
    return max(1, min(REFERENCE_TIMINGS, math.ceil(samples / max(1, interleave))))


def _reference_key(index: int) -> str:
    return f"{BERT_BASE}#reference-{index}"


def _record_key(record: dict[str, Any]) -> str:
    """A record's place in its profile: the architecture, or which of BERT-base's timings it is."""
    return _reference_key(int(record.get("reference_index", 0))) if record.get("reference") else record["arch"]


def _spread(samples: list[str], references: list[str]) -> list[str]:
    """``samples`` with ``references`` placed evenly from the first position to the last, so that
    they fall into different chunks, minutes apart."""
    order = list(samples)
    for i, key in enumerate(references):
        at = round(i * len(samples) / (len(references) - 1)) + i if len(references) > 1 else 0
        order.insert(min(at, len(order)), key)
    return order


def _check_resumable(out: Path, settings: LatencySettings, space: SearchSpace) -> dict[str, dict[str, Any]]:
    records = read_records(out)
    # Rewrite without a torn last line, so the next append starts on a fresh line.
    atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in records))
    for record in records:
        old = shape_of(record["fingerprint"])
        if old != settings.shape():
            raise UserError(f"{out} was measured with {old}, not {settings.shape()}; use another --out or the same options")
        if not record.get("reference") and record.get("space") != space.to_dict():
            raise UserError(f"{out} profiles another search space; use another --out or the same --space")
    return {_record_key(record): record for record in records}


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="arch", disable=not enabled, dynamic_ncols=True)


def write_output_config(out: str | Path, arguments: dict[str, Any]) -> Path:
    """``<out>.config.yaml`` next to a single-file output (several stages may share a directory)."""
    import yaml

    out = Path(out)
    clean = {k: (str(v) if isinstance(v, Path) else v) for k, v in arguments.items() if not callable(v)}
    path = out.with_name(out.name + ".config.yaml")
    atomic_write_text(path, yaml.safe_dump(clean, sort_keys=True))
    return path
