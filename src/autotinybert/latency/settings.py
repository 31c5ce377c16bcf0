"""How one latency measurement is taken: engine, shapes, threads, repeats, clock.

Paper §4.1: CPU, one thread, batch 1, sequence length 128 are the defaults.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

from ..errors import UserError

ENGINES = ("torch", "onnxruntime")
CLOCKS = ("wall", "cpu")


@dataclasses.dataclass(frozen=True)
class LatencySettings:
    """How to time one architecture. Defaults are the paper's: CPU, 1 thread, batch 1, seq 128."""

    engine: str = "torch"
    batch_size: int = 1
    seq_len: int = 128
    threads: int = 1
    warmup: int = 3
    repeats: int = 20
    vocab_size: int = 30522
    clock: str = "wall"

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise UserError(f"unknown latency engine {self.engine!r}: use one of {', '.join(ENGINES)}")
        if self.clock not in CLOCKS:
            raise UserError(f"unknown --clock {self.clock!r}: use one of {', '.join(CLOCKS)}")
        if self.clock == "cpu" and self.threads != 1:
            raise UserError("--clock cpu sums CPU time over threads, which is latency only with --threads 1; "
                            "use --clock wall for multi-threaded measurements")
        for name in ("batch_size", "seq_len", "threads", "repeats", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be an integer >= 1; got {value!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise UserError(f"--warmup must be an integer >= 0; got {self.warmup!r}")

    def shape(self) -> dict[str, Any]:
        return {"engine": self.engine, "batch_size": self.batch_size, "seq_len": self.seq_len, "threads": self.threads,
                "clock": self.clock}

    def timer(self) -> Callable[[], float]:
        """Wall clock (what a user waits) or this process's CPU time.

        With one thread the forward pass runs entirely on the calling thread, so process CPU
        time equals wall time on an idle machine, but does not count time the scheduler gives
        to other processes: on a shared machine it removes time-slicing noise (not cache or
        memory-bandwidth contention).
        """
        return time.perf_counter if self.clock == "wall" else time.process_time


def settings_of(fp: dict[str, Any], **timing: int) -> LatencySettings:
    """The settings a fingerprint was measured with (to re-measure or compare like with like)."""
    return LatencySettings(engine=fp.get("engine", "torch"), batch_size=fp.get("batch_size", 1),
                           seq_len=fp.get("seq_len", 128), threads=fp.get("threads", 1), clock=fp.get("clock", "wall"),
                           **timing)


_settings_of = settings_of  # the name develop.py imports
