"""Evolutionary search over per-unit sparsity levels (EvoPress-style level switching, with a population).

Pure search: no model here. A *genome* is one integer level per unit (a Linear layer or a decoder block).
Unit ``u`` has levels ``lower[u] … upper[u]`` and one level step of unit ``u`` removes ``weight[u]`` quanta of
weights, so the budget is the linear constraint

    Σ_u weight[u] · g[u] = budget.                                                     (1)

The allocator builds the grid so that every unit's step removes the same number of weights (EvoPress: the
sparsity step of unit u is Δ_u = c / n_u for a fixed weight count c), i.e. ``weight[u] = 1``; mixed N:M of
units of different sizes gives unequal integer weights. The operators keep (1) exactly:

* **mutation** (level switch): one unit up a level, another unit *with the same weight* down a level;
* **crossover**: each unit's level from one of two parents (uniform), then **repair**: single-level moves
  towards the budget until (1) holds again.

Selection is elitist (μ+λ): λ offspring per generation are scored on a cheap fitness stage, the best few
re-scored on more tokens (multi-fidelity: ``survivors`` per stage), and the next population is the best μ of
parents and final-stage offspring. The fitness is passed to :meth:`Evolution.run`: ``fitness(genome, stage) ->
float``, lower is better, and deterministic (the same genome and stage always score the same) for resume to be exact.

The :class:`SearchState` (population, fitnesses, generation, RNG state, counters, configuration fingerprint) is
written atomically after every generation, and the generation's best/mean record appended to a JSON-lines history
(O(population) per generation however long the search); ``resume=True`` continues from it and reaches
the same result as an uninterrupted run with the same seed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from msp.allocation.base import AllocationError
from msp.errors import MspError
from msp.io import fsync_dir, read_json, write_json_atomic, write_text_atomic
from msp.numerics import NonFiniteError, location

log = logging.getLogger(__name__)

#: fitness(genome, stage) -> float; lower is better; stage 0 is the cheapest, the last one the most precise.
#: A fitness may also offer ``fitness.many(genomes, stage) -> list[float]``: all of a stage's genomes scored
#: together (one pass over the blocks, several ranks); :meth:`Evolution.score_all` uses it when it is there.
Fitness = Callable[[np.ndarray, int], float]

STATE_VERSION = 2  # 2: the history in its own JSON-lines file (1: inside the state)


class SearchError(AllocationError, MspError):
    """A search that cannot run as configured (infeasible budget, bad options, foreign checkpoint).

    The search is the ``msp`` allocator, so its errors are allocation errors (and msp errors: named explicitly
    until :class:`AllocationError` subclasses :class:`MspError` itself)."""


@dataclass(frozen=True)
class SearchSpace:
    """Integer levels per unit with the budget constraint Σ weight·level = budget (eq. 1)."""

    lower: tuple[int, ...]
    upper: tuple[int, ...]
    weight: tuple[int, ...]
    budget: int

    def __post_init__(self) -> None:
        n = len(self.lower)
        if n == 0:
            raise SearchError("the search space has no units")
        if len(self.upper) != n or len(self.weight) != n:
            raise SearchError(f"lower/upper/weight must have one entry per unit ({n}); got {len(self.upper)} and {len(self.weight)}")
        if any(lo > hi for lo, hi in zip(self.lower, self.upper)):
            raise SearchError("some unit has lower level > upper level")
        if any(w <= 0 for w in self.weight):
            raise SearchError("every unit's level step must remove a positive number of weights")
        lo, hi = self.cost(np.asarray(self.lower)), self.cost(np.asarray(self.upper))
        if not lo <= self.budget <= hi:
            raise SearchError(f"the budget {self.budget} is outside what the levels can reach [{lo}, {hi}]")

    @property
    def units(self) -> int:
        return len(self.lower)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.asarray(self.lower, np.int64), np.asarray(self.upper, np.int64), np.asarray(self.weight, np.int64)

    def cost(self, genome: np.ndarray) -> int:
        return int(np.dot(np.asarray(genome, np.int64), np.asarray(self.weight, np.int64)))

    def feasible(self, genome: np.ndarray) -> bool:
        g = np.asarray(genome)
        lower, upper, _ = self.arrays()
        return g.shape == (self.units,) and bool(np.all(g >= lower) and np.all(g <= upper)) and self.cost(g) == self.budget


@dataclass(frozen=True)
class EvolutionConfig:
    """Search budget and operators. ``survivors[s]``: offspring kept after stage ``s`` (one entry per stage but
    the last; ``()`` = a single stage). Changing ``generations`` keeps a checkpoint valid (to extend a search)."""

    generations: int = 40
    population: int = 4
    offspring: int = 8
    survivors: tuple[int, ...] = (2,)
    crossover: float = 0.25
    max_swaps: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise SearchError(msg)

        need(int(self.generations) >= 0, f"allocation.generations={self.generations} must be >= 0, e.g. allocation.generations=40")
        need(int(self.population) >= 1, f"allocation.population={self.population} must be >= 1, e.g. allocation.population=4")
        need(int(self.offspring) >= 1, f"allocation.offspring={self.offspring} must be >= 1, e.g. allocation.offspring=8")
        need(0.0 <= float(self.crossover) <= 1.0, f"allocation.crossover={self.crossover} is a probability in [0, 1], e.g. 0.25")
        need(int(self.max_swaps) >= 1, f"allocation.max_swaps={self.max_swaps} must be >= 1, e.g. allocation.max_swaps=3")
        prev = int(self.offspring)
        for s, k in enumerate(self.survivors):
            need(1 <= int(k) <= prev, f"allocation.stages[{s}].survivors={k} must be in [1, {prev}] (offspring left after the previous stage)")
            prev = int(k)

    @property
    def stages(self) -> int:
        return len(self.survivors) + 1

    def fingerprint_fields(self) -> dict:
        fields = asdict(self)
        fields.pop("generations")
        fields["survivors"] = list(self.survivors)
        return fields


def history_path(state_path: Path) -> Path:
    """The JSON-lines history next to a checkpoint: ``search_state.json`` → ``search_history.jsonl``."""
    state_path = Path(state_path)
    return state_path.with_name(state_path.stem.replace("state", "history") + ".jsonl")


def _unreadable(path: Path, why: str) -> SearchError:
    return SearchError(f"search checkpoint {path} is unreadable ({why}); delete it or drop allocation.resume=true to start a new search")


@dataclass
class SearchState:
    """Everything needed to continue a search exactly where it stopped.

    Two files, so that a generation's checkpoint costs O(population), not O(generations):

    * the state (``search_state.json``, rewritten atomically every generation): every field but ``history``;
    * the history (``search_history.jsonl``, :func:`history_path`): one JSON line per generation 0, 1, …,
      appended (flushed and fsynced) *before* the state is rewritten. A kill between the two writes leaves one line
      beyond the state's generation (possibly cut short); :meth:`load` drops such lines.

    Version 1 checkpoints (the history inside the state file) are still read.
    """

    generation: int
    population: list[list[int]]
    fitness: list[float]
    rng_state: dict
    history: list[dict]
    evaluations: int
    fingerprint: str
    fingerprint_fields: dict
    initial: dict  # {"genome": [...], "fitness": float}: the first individual of the initial population
    wall_seconds: float = 0.0
    version: int = STATE_VERSION

    def save(self, path: Path) -> None:
        """Rewrite the state file (O(population)); the history is written by :meth:`append_history`."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "history"}  # asdict would copy the history
        write_json_atomic(Path(path), data)

    @staticmethod
    def append_history(path: Path, record: dict, *, new: bool = False) -> None:
        """Append one generation's record to the history of the checkpoint ``path`` (``new``: start the file)."""
        hist = history_path(path)
        hist.parent.mkdir(parents=True, exist_ok=True)
        with open(hist, "w" if new else "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if new:
            fsync_dir(hist.parent)  # the new file's name is on disk too

    @classmethod
    def load(cls, path: Path) -> "SearchState":
        path = Path(path)
        try:
            data = read_json(path)
            version = data.get("version")
            if version not in (1, STATE_VERSION):
                raise SearchError(f"search checkpoint {path} has version {version}, this msp writes {STATE_VERSION}")
            if version == 1:  # the history inside: written out as the JSON-lines file this version appends to
                history = data.pop("history")
                _write_history(path, history)
            else:
                history = _read_history(path, int(data["generation"]))
            data["version"] = STATE_VERSION
            return cls(**data, history=history)
        except (json.JSONDecodeError, TypeError, KeyError) as exc:
            raise _unreadable(path, type(exc).__name__) from exc


def _read_history(path: Path, generation: int) -> list[dict]:
    """Records 0 … ``generation`` of the history of checkpoint ``path``; lines beyond (a kill between the history
    append and the state write) are dropped from the file. A missing record is a :class:`SearchError`."""
    hist = history_path(path)
    if not hist.exists():
        raise _unreadable(path, f"{hist.name} is missing")
    records, keep_bytes = [], 0
    with open(hist, "rb") as fh:
        for line in fh:
            if len(records) > generation:
                break
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break  # a line cut short by a kill: only the last one can be
            if not line.endswith(b"\n") or rec.get("generation") != len(records):
                break
            records.append(rec)
            keep_bytes += len(line)
    if len(records) != generation + 1:
        raise _unreadable(path, f"{hist.name} holds {len(records)} generation(s), the state is at generation {generation}")
    if hist.stat().st_size != keep_bytes:
        with open(hist, "r+b") as fh:
            fh.truncate(keep_bytes)
    return records


def _write_history(path: Path, history: list[dict]) -> None:
    """The whole history of checkpoint ``path`` as JSON lines (temp + fsync + rename)."""
    write_text_atomic(history_path(path), "".join(json.dumps(r) + "\n" for r in history))


@dataclass
class SearchResult:
    best: np.ndarray
    best_fitness: float
    initial: np.ndarray
    initial_fitness: float
    history: list[dict]
    evaluations: int
    generations: int
    resumed_from: int | None
    wall_seconds: float
    population: list[np.ndarray] = field(default_factory=list)
    fitness: list[float] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------- operators


def mutate(genome: np.ndarray, space: SearchSpace, rng: np.random.Generator, swaps: int = 1) -> np.ndarray:
    """``swaps`` level switches: a random unit one level up, a random other unit of equal weight one level down.

    Each switch changes the cost (eq. 1) by ``+w − w = 0``. A switch with no valid pair is skipped.
    """
    g = np.array(genome, dtype=np.int64, copy=True)
    lower, upper, weight = space.arrays()
    for _ in range(int(swaps)):
        ups = np.flatnonzero(g < upper)
        if ups.size == 0:
            break
        for _try in range(4):
            u = int(ups[rng.integers(ups.size)])
            downs = np.flatnonzero((g > lower) & (weight == weight[u]))
            downs = downs[downs != u]
            if downs.size:
                v = int(downs[rng.integers(downs.size)])
                g[u] += 1
                g[v] -= 1
                break
    return g


def crossover(a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Uniform crossover: each unit's level from ``a`` or ``b`` with probability 1/2 (off budget in general)."""
    take_a = rng.random(len(a)) < 0.5
    return np.where(take_a, np.asarray(a, np.int64), np.asarray(b, np.int64))


def repair(genome: np.ndarray, space: SearchSpace, rng: np.random.Generator | None = None, guide: np.ndarray | None = None) -> np.ndarray:
    """Clip to the bounds, then single-level moves until Σ weight·g = budget.

    While the cost is above the budget, lower a unit whose weight does not overshoot the remaining excess
    (any movable unit when none fits); symmetrically below. With ``guide`` (real-valued target levels) the
    unit moved is the one furthest from its guide in the needed direction (nearest rounding); otherwise a
    random one. Raises :class:`SearchError` if the budget cannot be reached (cannot happen when all weights
    are equal and the space is feasible).
    """
    lower, upper, weight = space.arrays()
    g = np.clip(np.asarray(genome, np.int64), lower, upper)
    excess = space.cost(g) - space.budget
    limit = int(np.sum(upper - lower)) * 4 + 16
    for _ in range(limit):
        if excess == 0:
            return g
        direction = -1 if excess > 0 else 1
        movable = (g > lower) if direction < 0 else (g < upper)
        fits = movable & (weight <= abs(excess))
        pool = np.flatnonzero(fits) if fits.any() else np.flatnonzero(movable)
        if pool.size == 0:
            break
        if not fits.any():
            pool = pool[weight[pool] == weight[pool].min()]  # overshoot as little as possible
        if guide is not None:
            residual = (np.asarray(guide, float)[pool] - g[pool]) * direction  # how much the unit wants this move
            u = int(pool[np.argmax(residual)])  # argmax takes the first of ties: deterministic
        else:
            assert rng is not None, "repair needs an rng or a guide"
            u = int(pool[rng.integers(pool.size)])
        g[u] += direction
        excess += direction * int(weight[u])
    if excess == 0:
        return g
    raise SearchError(f"could not repair the genome onto the budget (off by {excess} quanta); widen allocation.min/max")


def snap(levels: np.ndarray, space: SearchSpace) -> np.ndarray:
    """The feasible genome nearest to real-valued ``levels``: round, clip, repair guided by the rounding error."""
    real = np.asarray(levels, float)
    return repair(np.rint(real).astype(np.int64), space, guide=real)


# ---------------------------------------------------------------------------------------------------- the search


def fingerprint_of(fields: dict) -> str:
    payload = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _diff_keys(a: dict, b: dict) -> list[str]:
    keys = sorted(set(a) | set(b))
    return [k for k in keys if json.dumps(a.get(k), sort_keys=True, default=str) != json.dumps(b.get(k), sort_keys=True, default=str)]


class Evolution:
    """(μ+λ) evolutionary search with multi-fidelity selection and per-generation checkpoints.

    Built from the space and the configuration alone (a checkpoint can be checked before any fitness exists);
    :meth:`run` takes the fitness. ``describe(genome) -> str`` renders the current best for the log;
    ``on_generation(generation, best, mean, best_genome)`` is called after every generation (e.g. for a tracker).
    ``writer=False`` (ranks other than 0 of a distributed search, :mod:`msp.distributed`): the same search, without
    writing the checkpoint, logging the generations or calling ``on_generation``.
    """

    def __init__(
        self,
        space: SearchSpace,
        config: EvolutionConfig,
        *,
        checkpoint: Path | None = None,
        fingerprint_extra: dict | None = None,
        describe: Callable[[np.ndarray], str] | None = None,
        on_generation: Callable[[int, float, float, np.ndarray], None] | None = None,
        writer: bool = True,
    ):
        self.space = space
        self.config = config
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.fields = {
            "config": config.fingerprint_fields(),
            "space": {"lower": list(space.lower), "upper": list(space.upper), "weight": list(space.weight), "budget": space.budget},
            **(fingerprint_extra or {}),
        }
        self.fingerprint = fingerprint_of(self.fields)
        self.describe = describe or (lambda g: " ".join(str(int(x)) for x in g))
        self.on_generation = on_generation
        self.writer = writer
        self._memo: dict[tuple[tuple[int, ...], int], float] = {}
        self.evaluations = 0

    # -- checkpoint -------------------------------------------------------------------------------------------

    def load_checkpoint(self, path: Path | None = None) -> SearchState | None:
        """The saved state at ``path`` (default: this search's checkpoint) if it exists and matches this
        configuration; None if there is none; :class:`SearchError` naming the differing settings otherwise."""
        path = Path(path) if path is not None else self.checkpoint
        if path is None or not path.exists():
            return None
        state = SearchState.load(path)
        if state.fingerprint != self.fingerprint:
            diff = _diff_keys(state.fingerprint_fields, self.fields)
            sub = []
            for k in diff:
                old, new = state.fingerprint_fields.get(k), self.fields.get(k)
                if isinstance(old, dict) and isinstance(new, dict):
                    sub += [f"{k}.{s}" for s in _diff_keys(old, new)]
                else:
                    sub.append(k)
            raise SearchError(
                f"search checkpoint {path} was written by a different configuration (differs in: {', '.join(sub) or 'unknown'}); "
                f"rerun with the same settings, or drop allocation.resume=true (or delete the file) to start a new search"
            )
        return state

    # -- fitness ----------------------------------------------------------------------------------------------

    @staticmethod
    def checked(value: float, genome: Sequence[int], stage: int) -> float:
        """``value`` as a float; NaN is :class:`msp.numerics.NonFiniteError` naming the stage and the genome.

        A NaN fitness means the comparison itself is broken (a NaN dense reference, NaN logits), and ranking it
        as +inf would let the search go on to an arbitrary allocation, so it stops. +inf stays: an honest score
        of a candidate whose KL overflows (logits too far from the dense model's), which ranks last."""
        value = float(value)
        if math.isnan(value):
            levels = [str(int(x)) for x in genome]
            shown = " ".join(levels[:16]) + (f" ... ({len(levels)} units)" if len(levels) > 16 else "")
            where = location(f"search fitness (fidelity stage {int(stage)})")
            raise NonFiniteError(
                f"NaN/inf in the fitness of candidate [{shown}] (NaN) at {where}; the dense "
                f"reference or the candidate's logits are not finite: check the model's weights or run in a wider dtype (dtype=float32)",
                stage=f"search fitness (fidelity stage {int(stage)})")
        return value

    def score(self, fitness: Fitness, genome: np.ndarray, stage: int) -> float:
        """``fitness(genome, stage)``, memoised (each genome and stage is evaluated once); NaN stops the search
        (:meth:`checked`), +inf ranks last."""
        key = (tuple(int(x) for x in genome), int(stage))
        if key not in self._memo:
            value = self.checked(fitness(np.asarray(genome, np.int64), int(stage)), key[0], key[1])
            self._memo[key] = value
            self.evaluations += 1
        return self._memo[key]

    def score_all(self, fitness: Fitness, genomes: Sequence[np.ndarray], stage: int) -> list[float]:
        """The fitness of every genome at ``stage``, memoised like :meth:`score`; the genomes not scored yet go to
        ``fitness.many`` together (in order, each once) when the fitness offers it, else one call each."""
        keys = [(tuple(int(x) for x in g), int(stage)) for g in genomes]
        todo: list[tuple] = []
        for key in keys:
            if key not in self._memo and key not in todo:
                todo.append(key)
        many = getattr(fitness, "many", None)
        if todo and many is not None:
            values = [float(v) for v in many([np.asarray(k[0], np.int64) for k in todo], int(stage))]
            if len(values) != len(todo):
                raise SearchError(f"fitness.many returned {len(values)} values for {len(todo)} genomes")
            for key, value in zip(todo, values):
                self._memo[key] = self.checked(value, key[0], key[1])
                self.evaluations += 1
        return [self.score(fitness, np.asarray(k[0], np.int64), k[1]) for k in keys]

    def cached(self, genome: np.ndarray, stage: int) -> float | None:
        """The fitness of ``genome`` at ``stage`` if it was evaluated in this process, else None."""
        return self._memo.get((tuple(int(x) for x in genome), int(stage)))

    # -- one generation ---------------------------------------------------------------------------------------

    def offspring(self, population: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
        """λ new genomes (none equal to a parent or to each other), by crossover + repair and/or mutation."""
        cfg = self.config
        children: list[np.ndarray] = []
        seen = {tuple(int(x) for x in g) for g in population}
        for _ in range(20 * cfg.offspring):
            if len(children) == cfg.offspring:
                break
            if len(population) >= 2 and rng.random() < cfg.crossover:
                i, j = rng.choice(len(population), size=2, replace=False)
                child = repair(crossover(population[i], population[j], rng), self.space, rng)
                swaps = int(rng.integers(0, cfg.max_swaps + 1))
            else:
                child = population[int(rng.integers(len(population)))]
                swaps = int(rng.integers(1, cfg.max_swaps + 1))
            child = mutate(child, self.space, rng, swaps)
            key = tuple(int(x) for x in child)
            if key in seen:
                continue
            seen.add(key)
            children.append(child)
        return children

    def step(
        self, fitness: Fitness, population: list[np.ndarray], values: list[float], rng: np.random.Generator
    ) -> tuple[list[np.ndarray], list[float]]:
        """One generation: offspring → stage-by-stage selection → best μ of parents ∪ finalists (``values``: the
        parents' final-stage fitness)."""
        cfg = self.config
        candidates = self.offspring(population, rng)
        for s, keep in enumerate(cfg.survivors):
            scores = self.score_all(fitness, candidates, s)
            order = sorted(range(len(candidates)), key=lambda k: (scores[k], k))
            candidates = [candidates[k] for k in order[:keep]]
        final = self.score_all(fitness, candidates, cfg.stages - 1)
        pool = list(zip(population, values)) + list(zip(candidates, final))
        order = sorted(range(len(pool)), key=lambda k: (pool[k][1], k))  # parents first among ties
        chosen = [pool[k] for k in order[: cfg.population]]
        return [g for g, _ in chosen], [f for _, f in chosen]

    # -- driver -----------------------------------------------------------------------------------------------

    def run(
        self,
        fitness: Fitness,
        initial_population: Callable[[], Sequence[np.ndarray]] | Sequence[np.ndarray],
        resume: bool = False,
        resume_from: Path | None = None,
    ) -> SearchResult:
        """Search with ``fitness`` from ``initial_population`` (a callable is only called when not resuming), or
        resume from ``resume_from`` (default: this search's own checkpoint). The state is saved to ``checkpoint``."""
        cfg = self.config
        started = time.perf_counter()
        source = Path(resume_from) if resume_from is not None else self.checkpoint
        rng = np.random.default_rng(cfg.seed)
        state = self._resume(source, rng) if resume else None
        resumed_from = None if state is None else state.generation
        if state is None:
            genomes = initial_population() if callable(initial_population) else initial_population
            state = self._start(fitness, genomes, rng, started)
        population = [np.asarray(g, np.int64) for g in state.population]
        values = list(state.fitness)
        bar = tqdm(range(state.generation, cfg.generations), desc="search", unit="gen", leave=False, initial=state.generation, total=cfg.generations)
        for _ in bar:
            t0 = time.perf_counter()
            population, values = self.step(fitness, population, values, rng)
            state.generation += 1
            state.population = [g.tolist() for g in population]
            state.fitness = list(values)
            state.rng_state = rng.bit_generator.state
            state.evaluations = self.evaluations
            record = self._record(state.generation, values, time.perf_counter() - t0)
            state.history.append(record)
            state.wall_seconds += time.perf_counter() - t0
            self._save(state, record)
            bar.set_postfix(best=f"{values[0]:.4f}", mean=f"{float(np.mean(values)):.4f}")
            self._log(state.generation, values, population[0])
        bar.close()
        best = int(np.argmin(values))
        return SearchResult(
            best=population[best], best_fitness=float(values[best]), initial=np.asarray(state.initial["genome"], np.int64),
            initial_fitness=float(state.initial["fitness"]), history=state.history, evaluations=self.evaluations,
            generations=state.generation, resumed_from=resumed_from, wall_seconds=time.perf_counter() - started,
            population=population, fitness=values,
        )

    def _resume(self, source: Path | None, rng: np.random.Generator) -> SearchState | None:
        """The checkpoint at ``source`` with the RNG, the evaluation count and the memo restored; None if there is none."""
        state = self.load_checkpoint(source)
        if state is None:
            log.warning("allocation.resume=true but there is no search checkpoint at %s; starting a new search", source)
            return None
        rng.bit_generator.state = state.rng_state
        self.evaluations = state.evaluations
        log.info("resuming the search from %s at generation %d/%d (best fitness %.5f)", source, state.generation,
                 self.config.generations, min(state.fitness))
        for g, f in zip(state.population, state.fitness):
            self._memo[(tuple(int(x) for x in g), self.config.stages - 1)] = f
        if self.writer and self.checkpoint is not None and Path(source).resolve() != self.checkpoint.resolve():
            _write_history(self.checkpoint, state.history)  # continued here: this run dir's files start complete
            state.save(self.checkpoint)
        return state

    def _start(self, fitness: Fitness, genomes: Sequence[np.ndarray], rng: np.random.Generator, started: float) -> SearchState:
        """Generation 0: the scored initial population, saved."""
        population, values, initial = self._initial(fitness, genomes, rng)
        state = SearchState(
            generation=0, population=[g.tolist() for g in population], fitness=values, rng_state=rng.bit_generator.state,
            history=[self._record(0, values)], evaluations=self.evaluations, fingerprint=self.fingerprint,
            fingerprint_fields=self.fields, initial=initial, wall_seconds=time.perf_counter() - started,
        )
        self._save(state, state.history[0], new=True)
        self._log(0, values, population[0])
        return state

    def _initial(
        self, fitness: Fitness, genomes: Sequence[np.ndarray], rng: np.random.Generator
    ) -> tuple[list[np.ndarray], list[float], dict]:
        """Score the initial genomes (final stage), fill up to μ with mutants, keep the best μ. Also returns
        ``{"genome", "fitness"}`` of the first initial genome (the sensitivity allocation) for the report."""
        cfg = self.config
        unique: list[np.ndarray] = []
        seen: set = set()
        for g in genomes:
            g = np.asarray(g, np.int64)
            if not self.space.feasible(g):
                raise SearchError(f"an initial genome is off the grid or off the budget (cost {self.space.cost(g)} vs {self.space.budget})")
            key = tuple(int(x) for x in g)
            if key not in seen:
                seen.add(key)
                unique.append(g)
        if not unique:
            raise SearchError("the search needs at least one initial genome")
        for _ in range(20 * cfg.population):
            if len(unique) >= cfg.population:
                break
            g = mutate(unique[int(rng.integers(len(unique)))], self.space, rng, int(rng.integers(1, cfg.max_swaps + 1)))
            key = tuple(int(x) for x in g)
            if key not in seen:
                seen.add(key)
                unique.append(g)
        last = cfg.stages - 1
        scores = self.score_all(fitness, unique, last)
        order = sorted(range(len(unique)), key=lambda k: (scores[k], k))[: cfg.population]
        return [unique[k] for k in order], [scores[k] for k in order], {"genome": unique[0].tolist(), "fitness": scores[0]}

    def _record(self, generation: int, values: list[float], seconds: float | None = None) -> dict:
        rec = {"generation": generation, "best": float(min(values)), "mean": float(np.mean(values)), "evaluations": self.evaluations}
        if seconds is not None:
            rec["seconds"] = seconds
        return rec

    def _save(self, state: SearchState, record: dict, new: bool = False) -> None:
        """The history line first, then the state: a kill in between leaves a line that :meth:`SearchState.load` drops."""
        if self.checkpoint is not None and self.writer:
            SearchState.append_history(self.checkpoint, record, new=new)
            state.save(self.checkpoint)

    def _log(self, generation: int, values: list[float], best: np.ndarray) -> None:
        if not self.writer:
            return
        mean = float(np.mean(values))
        log.info("search generation %d/%d: best fitness %.5f, mean %.5f, %d evaluations; best: %s",
                 generation, self.config.generations, min(values), mean, self.evaluations, self.describe(best))
        if self.on_generation is not None:
            self.on_generation(generation, float(min(values)), mean, best)


__all__ = ["SearchSpace", "EvolutionConfig", "SearchState", "SearchResult", "SearchError", "Evolution", "Fitness",
           "mutate", "crossover", "repair", "snap", "fingerprint_of", "history_path"]
