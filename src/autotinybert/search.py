"""Architecture search under a latency constraint (AutoTinyBERT §3.3, official ``searcher.py``).

Pure: this module sees only architectures, a *fitness function* ``Arch -> float`` (higher is
better) and a vectorised *latency function* ``(N, 5) features -> (N,) ms`` (the predictor's
``predict_features``). It never imports torch or the models, so it is tested on toy problems.

* **Candidates** of a target are the grid points whose predicted latency lies in
  ``[low, high] × target`` (paper: [0.85, 1.1]). The grid is the SuperPLM's space, by default
  on the official searcher's coarser steps (d_m step 16, d_f step 32). It is enumerated with
  numpy, one layer count at a time, so the paper's millions of points never become `Arch`
  objects.
* **random**: ``generations × generation_size`` distinct candidates.
* **fast**: the same, but only candidates with 1.6·d_m ≤ d_f ≤ 1.9·d_m and
  0.7·d_m ≤ d_qkv ≤ d_m (the paper runs one generation: ``generations=1``).
* **evolved**: generation 0 is random; each later child is, with probability ``explore_rate``,
  a fresh random candidate, else a roulette-chosen parent (weight = fitness − min fitness) of
  the population, mutated by `SearchSpace.mutate`; a child is kept only if this target has not
  seen it and it lies in the window. The population is the best ``generation_size``
  architectures seen so far for the target (elitist: a good parent is never lost to one bad
  generation; the paper does not say, and the official code keeps the best too).

Evaluations go through a cache keyed by (architecture, evaluator key): several targets share
it, and ``resume`` fills it from ``state.json``. Resuming re-runs the deterministic algorithm
from the start; the cache answers every evaluation done before, so the result is exactly the
uninterrupted one and nothing is evaluated twice.

A generation's members are chosen before any of them is evaluated (within a generation no
choice depends on a sibling's fitness), then evaluated as one batch. A fitness function that
also has ``imap(archs)`` (e.g. `autotinybert.evaluators.WorkerPool`) evaluates the batch in
several processes; the result is the same as one at a time.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .files import atomic_write_json
from .settings import METHODS, SearchSettings  # noqa: F401 - re-exported: the search's settings
from .space import Arch, Dim, SearchSpace

STATE_FORMAT = "autotinybert-search-state"
STATE_VERSION = 1

Fitness = Callable[[Arch], float]  # optionally with imap(archs) -> iterator of (fitness, seconds), in order
Latency = Callable[[np.ndarray], np.ndarray]


# --- targets and settings ---------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """A latency budget: ``ms`` on the predictor's device, optionally stated as a speedup."""

    ms: float
    speedup: float | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.ms, (int, float)) and np.isfinite(self.ms) and self.ms > 0):
            raise UserError(f"a latency target must be a positive number of milliseconds; got {self.ms!r}")

    @property
    def name(self) -> str:
        return f"{self.speedup:g}x" if self.speedup is not None else f"{self.ms:g}ms"

    def to_dict(self) -> dict:
        return {"name": self.name, "ms": self.ms, "speedup": self.speedup}


def make_targets(speedups: Iterable[float] = (), target_ms: Iterable[float] = (),
                 reference_ms: float | None = None) -> list[Target]:
    """Targets from speedups over BERT-base (needs ``reference_ms``) and absolute budgets."""
    targets = []
    for s in speedups:
        if reference_ms is None:
            raise UserError("a --speedup needs the BERT-base reference latency, which this predictor lacks; "
                            "give --target-ms or re-fit the predictor from a 'latency profile' file")
        if not s > 0:
            raise UserError(f"a speedup must be positive; got {s}")
        targets.append(Target(reference_ms / s, float(s)))
    targets.extend(Target(float(ms)) for ms in target_ms)
    if not targets:
        raise UserError("give at least one target: --speedup X (over BERT-base) or --target-ms MS")
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise UserError(f"targets repeat: {', '.join(names)}")
    return targets


def search_grid(space: SearchSpace, hidden_step: int | None = 16, ffn_step: int | None = 32) -> SearchSpace:
    """The space on the grid the search visits (official searcher: d_m step 16, d_f step 32).

    Membership is by ranges, so a coarser grid stays inside the SuperPLM's space; ``None``
    keeps the space's own step.
    """

    def restep(dim: Dim, step: int | None) -> Dim:
        return dim if step is None else Dim(dim.min, dim.max, step)

    return dataclasses.replace(space, hidden=restep(space.hidden, hidden_step), ffn=restep(space.ffn, ffn_step))


# --- candidates --------------------------------------------------------------------------------
def _chunks(space: SearchSpace) -> Iterable[np.ndarray]:
    """The grid as (n, 5) feature rows in FEATURE_NAMES order, one layer count per chunk."""
    hidden = np.array(space.hidden.values())
    ffn = np.array(space.ffn.values())
    if space.mode == "mlm":
        heads = np.array(space.heads.values())
        qkv = heads * space.head_size
    else:
        qkv = np.array(space.qkv.values())
        heads = np.full_like(qkv, space.heads.min)
    h, f, a = np.meshgrid(hidden, ffn, np.arange(len(heads)), indexing="ij")
    h, f, a = h.ravel(), f.ravel(), a.ravel()
    for layers in space.layers.values():
        yield np.stack([np.full_like(h, layers), h, f, heads[a], qkv[a]], axis=1)  # (n, 5)


def arch_of(row: Sequence) -> Arch:
    return Arch(*(int(v) for v in row))


def fast_rule(features: np.ndarray) -> np.ndarray:
    """Paper's "fast" heuristic: 1.6·d_m ≤ d_f ≤ 1.9·d_m and 0.7·d_m ≤ d_qkv ≤ d_m."""
    d_m, d_f, d_qkv = features[:, 1], features[:, 2], features[:, 4]
    return (1.6 * d_m <= d_f) & (d_f <= 1.9 * d_m) & (0.7 * d_m <= d_qkv) & (d_qkv <= d_m)


@dataclass
class Candidates:
    """Grid points inside one target's window: features (n, 5) int64 and latency (n,) ms."""

    target: Target
    low_ms: float
    high_ms: float
    features: np.ndarray
    latency_ms: np.ndarray

    def __len__(self) -> int:
        return len(self.latency_ms)


def find_candidates(space: SearchSpace, latency: Latency, targets: Sequence[Target],
                    window: tuple[float, float] = SearchSettings().window) -> list[Candidates]:
    """Every grid point in each target's window; an empty window is a `UserError` naming the
    nearest latency the grid can reach (and the architecture that reaches it)."""
    low, high = window
    bounds = [(low * t.ms, high * t.ms) for t in targets]
    kept: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in targets]
    nearest: list[tuple[float, float, np.ndarray | None]] = [(np.inf, np.nan, None) for _ in targets]
    lo_all, hi_all = np.inf, -np.inf
    for features in _chunks(space):
        ms = np.asarray(latency(features), dtype=np.float64).reshape(-1)
        if len(ms) != len(features) or not np.all(np.isfinite(ms)):
            raise UserError("the latency function returned a wrong number of values or non-finite ones")
        lo_all, hi_all = min(lo_all, float(ms.min())), max(hi_all, float(ms.max()))
        for i, (a, b) in enumerate(bounds):
            inside = (ms >= a) & (ms <= b)
            if inside.any():
                kept[i].append((features[inside], ms[inside]))
            # distance outside the window (0 inside), kept for the error message
            gap = np.maximum(a - ms, ms - b)
            j = int(np.argmin(gap))
            if gap[j] < nearest[i][0]:
                nearest[i] = (float(gap[j]), float(ms[j]), features[j].copy())
    out = []
    for target, (a, b), parts, (_, near_ms, near_row) in zip(targets, bounds, kept, nearest):
        if not parts:
            raise UserError(
                f"no architecture of the search grid has a predicted latency in the window "
                f"{a:.3g}..{b:.3g} ms of target {target.name} ({target.ms:.3g} ms); the nearest feasible latency is "
                f"{near_ms:.3g} ms ({arch_of(near_row)}), the grid spans {lo_all:.3g}..{hi_all:.3g} ms: "
                "choose a target in that range, widen --window, or use a larger space")
        out.append(Candidates(target, a, b, np.concatenate([p[0] for p in parts]).astype(np.int64),
                              np.concatenate([p[1] for p in parts])))
    return out


# --- evaluation cache and persisted state -------------------------------------------------------
class Evaluations:
    """Fitness cache keyed by (architecture, evaluator key), persisted to ``state.json``.

    The state is rewritten atomically after every new evaluation, so a kill loses at most the
    evaluation in flight.
    """

    def __init__(self, fitness: Fitness, evaluator_key: str, state_path: Path | None = None,
                 header: dict | None = None) -> None:
        self.fitness = fitness
        self.evaluator_key = evaluator_key
        self.state_path = state_path
        self.header = header or {}
        self.records: list[dict] = []  # one per evaluation ever made (this run or resumed ones)
        self.cache: dict[tuple[str, str], float] = {}
        self.new = 0  # evaluations made in this process

    def load(self, state: dict) -> None:
        for record in state.get("evaluations", []):
            self.records.append(record)
            self.cache[(record["arch"], record["evaluator"])] = float(record["fitness"])

    def get_many(self, archs: Sequence[tuple[Arch, float]], target: str, generation: int) -> Iterator[tuple[float, bool]]:
        """(fitness, whether it was evaluated now) of each (architecture, latency), in order.

        Missing ones are evaluated as one batch (in parallel when the fitness has ``imap``);
        each result is recorded and saved, and yielded, as soon as it and those before it are in.
        """
        missing = list(dict.fromkeys(str(arch) for arch, _ in archs if (str(arch), self.evaluator_key) not in self.cache))
        results = self._evaluate([Arch.parse(name) for name in missing])
        fresh = set(missing)
        for arch, latency_ms in archs:
            name = str(arch)
            if (name, self.evaluator_key) not in self.cache:
                value, seconds = next(results)
                self._record(name, value, seconds, latency_ms, target, generation)
            yield self.cache[(name, self.evaluator_key)], name in fresh

    def _evaluate(self, archs: list[Arch]) -> Iterable[tuple[float, float]]:
        imap = getattr(self.fitness, "imap", None)
        if imap is not None and len(archs) > 1:
            yield from imap(archs)
            return
        for arch in archs:
            start = time.perf_counter()
            value = self.fitness(arch)
            yield value, time.perf_counter() - start

    def _record(self, arch: str, value: float, seconds: float, latency_ms: float, target: str, generation: int) -> None:
        value = float(value)
        if not np.isfinite(value):
            raise UserError(f"the evaluator returned a non-finite fitness {value} for {arch}")
        self.cache[(arch, self.evaluator_key)] = value
        self.new += 1
        self.records.append({
            "arch": arch, "evaluator": self.evaluator_key, "fitness": value, "latency_ms": latency_ms,
            "target": target, "generation": generation, "seconds": round(seconds, 4),
        })
        self.save()

    def save(self) -> None:
        if self.state_path is not None:
            atomic_write_json(self.state_path, {**self.header, "evaluations": self.records})


# --- the methods ---------------------------------------------------------------------------------
class _Run:
    """One target's search: candidate draws, the seen set and the visit history."""

    def __init__(self, cands: Candidates, space: SearchSpace, latency: Latency, evals: Evaluations,
                 settings: SearchSettings, rng: random.Random, on_visit: Callable[[dict], None] | None) -> None:
        self.cands, self.space, self.latency, self.evals = cands, space, latency, evals
        self.settings, self.rng, self.on_visit = settings, rng, on_visit
        self.index = {tuple(int(v) for v in row): i for i, row in enumerate(cands.features)} \
            if settings.method == "evolved" else None
        self.seen: set[int] = set()  # candidate indices this target has visited
        self.visits: list[dict] = []

    def random_index(self, pool: np.ndarray | None = None) -> int | None:
        """An unseen candidate, uniformly; bounded draws, then an exact scan (None: exhausted)."""
        n = len(self.cands) if pool is None else len(pool)
        for _ in range(self.settings.max_tries):
            i = self.rng.randrange(n)
            i = i if pool is None else int(pool[i])
            if i not in self.seen:
                return i
        # Most of the window is seen (small windows): pick among the rest explicitly.
        every = range(len(self.cands)) if pool is None else (int(i) for i in pool)
        rest = [i for i in every if i not in self.seen]
        return self.rng.choice(rest) if rest else None

    def visit_all(self, chosen: list[int], generation: int) -> None:
        """Evaluate a generation's chosen candidates (already marked seen) and record the visits."""
        archs = [(arch_of(self.cands.features[i]), float(self.cands.latency_ms[i])) for i in chosen]
        for (arch, ms), (fitness, evaluated) in zip(archs, self.evals.get_many(archs, self.cands.target.name, generation)):
            record = {"arch": str(arch), "fitness": fitness, "latency_ms": ms, "generation": generation,
                      "evaluated": evaluated}
            self.visits.append(record)
            if self.on_visit:
                self.on_visit(record)

    def choose(self, i: int | None, chosen: list[int]) -> bool:
        """Add candidate ``i`` to this generation; False when there was none to add."""
        if i is None:
            return False
        self.seen.add(i)
        chosen.append(i)
        return True

    def mutant(self, parent: str) -> int | None:
        """A mutated parent that is new and in the window, or None after ``max_tries`` draws."""
        arch = Arch.parse(parent)
        for _ in range(self.settings.max_tries):
            child = self.space.mutate(arch, self.rng, self.settings.mutation)
            i = self.index.get(tuple(int(v) for v in self.space.features(child)))
            if i is not None and i not in self.seen:  # in the index == on the grid and in the window
                return i
        return None

    def sampled(self, pool: np.ndarray | None = None) -> None:
        """random / fast: generations × generation_size distinct draws, in generation-sized chunks."""
        s = self.settings
        for generation in range(s.generations):
            chosen: list[int] = []
            while len(chosen) < s.generation_size and self.choose(self.random_index(pool), chosen):
                pass
            self.visit_all(chosen, generation)
            if len(chosen) < s.generation_size:
                return  # every candidate visited

    def evolved(self) -> None:
        s = self.settings
        chosen: list[int] = []
        while len(chosen) < s.generation_size and self.choose(self.random_index(), chosen):
            pass
        self.visit_all(chosen, 0)
        if len(chosen) < s.generation_size:
            return
        for generation in range(1, s.generations):
            population = sorted(self.visits, key=lambda v: (-v["fitness"], v["arch"]))[:s.generation_size]
            lowest = min(v["fitness"] for v in population)
            weights = [v["fitness"] - lowest for v in population]
            chosen = []
            while len(chosen) < s.generation_size:
                i = None
                if self.rng.random() >= s.explore_rate:
                    # Roulette; all-equal fitness gives zero weights, so choose uniformly then.
                    parent = (self.rng.choices(population, weights=weights)[0] if sum(weights) > 0
                              else self.rng.choice(population))
                    i = self.mutant(parent["arch"])
                if i is None:  # explore, or the parent's neighbourhood is used up
                    i = self.random_index()
                if not self.choose(i, chosen):
                    break  # the whole window has been visited
            self.visit_all(chosen, generation)
            if len(chosen) < s.generation_size:
                return


def preference(visit: dict) -> tuple:
    """The order of preference among visits: a shortlist re-scored by `rerank` first (by that score),
    then the fitness; ties: the faster architecture, then the name."""
    return (0 if "rescored" in visit else 1, -visit.get("rescored", visit["fitness"]), visit["latency_ms"],
            visit["arch"])


@dataclass
class TargetResult:
    target: Target
    window_ms: tuple[float, float]
    candidates: int
    visits: list[dict]

    @property
    def best(self) -> dict:
        return min(self.visits, key=preference)

    def leaders(self, count: int) -> list[dict]:
        """The ``count`` fittest distinct architectures visited (ties: faster first)."""
        unique: dict[str, dict] = {}
        for visit in sorted(self.visits, key=lambda v: (-v["fitness"], v["latency_ms"], v["arch"])):
            unique.setdefault(visit["arch"], visit)
        return list(unique.values())[:count]

    def to_dict(self) -> dict:
        best = self.best
        return {
            "target": self.target.to_dict(), "window_ms": list(self.window_ms), "candidates": self.candidates,
            "visited": len(self.visits),
            "best": {"arch": best["arch"], "config": Arch.parse(best["arch"]).to_dict(), "fitness": best["fitness"],
                     "latency_ms": best["latency_ms"], **({"rescored": best["rescored"]} if "rescored" in best else {}),
                     "speedup": (self.target.ms * self.target.speedup / best["latency_ms"]
                                 if self.target.speedup else None)},
            "history": self.visits,
        }


def _target_rng(seed: int, target: Target) -> random.Random:
    # A string seed is hashed deterministically (sha512), independent of PYTHONHASHSEED.
    return random.Random(f"autotinybert-search:{seed}:{target.name}")


def search(space: SearchSpace, targets: Sequence[Target], fitness: Fitness, latency: Latency,
           settings: SearchSettings = SearchSettings(), *, evaluator_key: str = "fitness",
           state_path: str | Path | None = None, resume: bool = False,
           on_visit: Callable[[dict], None] | None = None,
           candidates: Sequence[Candidates] | None = None) -> tuple[list[TargetResult], Evaluations]:
    """Search every target in turn, sharing one evaluation cache; see the module docstring.

    ``space`` is the grid to search (see `search_grid`). With ``state_path`` the state is saved
    after every evaluation; ``resume`` loads it first (it must come from the same settings).
    """
    candidates = list(candidates) if candidates is not None else find_candidates(space, latency, targets, settings.window)
    check_method(candidates, settings.method)
    header = state_header(space, targets, settings, evaluator_key)
    state_path = Path(state_path) if state_path is not None else None
    evals = Evaluations(fitness, evaluator_key, state_path, header)
    if resume and state_path is not None and state_path.is_file():
        evals.load(read_state(state_path, header))
    elif state_path is not None and state_path.is_file() and not resume:
        raise UserError(f"{state_path} exists: pass --resume to continue that search or choose another --out")
    results = []
    for cands in candidates:
        run = _Run(cands, space, latency, evals, settings, _target_rng(settings.seed, cands.target), on_visit)
        if settings.method == "evolved":
            run.evolved()
        elif settings.method == "fast":
            run.sampled(np.flatnonzero(fast_rule(cands.features)))  # not empty: `check_method`
        else:
            run.sampled()
        results.append(TargetResult(cands.target, (cands.low_ms, cands.high_ms), len(cands), run.visits))
    evals.save()
    return results, evals


def rerank(results: Sequence[TargetResult], rescore: Fitness, count: int,
           on_visit: Callable[[dict], None] | None = None) -> None:
    """Re-score each target's ``count`` fittest architectures with ``rescore`` (e.g. the score after a
    short retrain: Minitron saw rankings right after pruning flip within ~200 steps and settle by
    ~300); `TargetResult.best` then picks among them by that score (``rescored`` in the visits)."""
    scores: dict[str, float] = {}
    for result in results:
        for leader in result.leaders(count):
            if leader["arch"] not in scores:
                scores[leader["arch"]] = float(rescore(Arch.parse(leader["arch"])))
            for visit in result.visits:
                if visit["arch"] == leader["arch"]:
                    visit["rescored"] = scores[leader["arch"]]
            if on_visit is not None:
                on_visit({**leader, "rescored": scores[leader["arch"]]})


def check_method(candidates: Sequence[Candidates], method: str) -> None:
    """Refuse a method no candidate can serve: callers run it before writing anything (search_stage)."""
    for cands in candidates:
        if method == "fast" and not fast_rule(cands.features).any():
            raise UserError(
                f"none of the {len(cands)} candidates of target {cands.target.name} satisfies the fast rule "
                "(1.6·d_m ≤ d_f ≤ 1.9·d_m, 0.7·d_m ≤ d_qkv ≤ d_m); use --method evolved or random")


def state_header(space: SearchSpace, targets: Sequence[Target], settings: SearchSettings, evaluator_key: str) -> dict:
    """What a search state must match to be resumed (`read_state`)."""
    return {"format": STATE_FORMAT, "version": STATE_VERSION, "settings": settings.key(), "evaluator": evaluator_key,
            "space": space.to_dict(), "targets": [t.to_dict() for t in targets]}


def read_state(path: Path, header: dict) -> dict:
    try:
        state = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is corrupt ({str(err).splitlines()[0]}); remove it to start the search again") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
        raise UserError(f"{path} is not a search state of this version; remove it or choose another --out")
    for key in ("settings", "space", "evaluator"):
        if state.get(key) != header[key]:
            raise UserError(f"{path} was written with a different {key} ({state.get(key)} vs {header[key]}); "
                            "resume with the same options or choose another --out")
    return state


# --- Pareto front ----------------------------------------------------------------------------------
def pareto_front(points: Iterable[dict]) -> list[dict]:
    """Points not dominated in (lower ``latency_ms``, higher ``fitness``), by increasing latency.

    One point per architecture; of equal-latency points only the fittest can be on the front,
    and a point must be strictly fitter than every faster one.
    """
    unique = {p["arch"]: p for p in points}
    front, best = [], -np.inf
    for p in sorted(unique.values(), key=lambda p: (p["latency_ms"], -p["fitness"], p["arch"])):
        if p["fitness"] > best:
            front.append(p)
            best = p["fitness"]
    return front



# --- output files ----------------------------------------------------------------------------------
def write_outputs(out: str | Path, results: Sequence[TargetResult], evals: Evaluations, extra: dict | None = None) -> dict:
    """``results.json`` (everything) and ``best.json`` (best architecture per target, as a config
    and as its short string), written atomically."""
    out = Path(out)
    front = pareto_front(evals.records)
    best = [{"target": r.target.name, "target_ms": r.target.ms, "arch": r.best["arch"],
             "config": Arch.parse(r.best["arch"]).to_dict(), "fitness": r.best["fitness"],
             "latency_ms": r.best["latency_ms"]} for r in results]
    summary = {
        **(extra or {}),
        "targets": [r.to_dict() for r in results],
        "best": best,
        "evaluations": len(evals.records),
        "new_evaluations": evals.new,
        "pareto_front": [{k: p[k] for k in ("arch", "latency_ms", "fitness")} for p in front],
    }
    atomic_write_json(out / "results.json", summary)
    atomic_write_json(out / "best.json", best)
    return summary
