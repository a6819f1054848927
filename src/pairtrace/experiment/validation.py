"""Causal validation: sample and judge models, and retrain + evaluate every unit of the plan (in parallel worker
processes when asked), each retrain a cached stage of its own."""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import shutil
import threading
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from pairtrace.experiment.context import Inputs, RunContext
from pairtrace.experiment.plan import Experiment, RetrainUnit
from pairtrace.processes import spawn_pool
from pairtrace.records import read_jsonl, write_json_atomic, write_jsonl_atomic
from pairtrace.stage_cache import chain_key, file_digest

logger = logging.getLogger(__name__)


def generate_and_judge(ctx: RunContext, name: str, models: list[str], prompts: str | Path, n_samples: int,
                       seed_offset: int = 0) -> dict[str, str]:
    """Sample each named model (M0, M1 or one registered with the context) on a prompt file with the run's
    generation engine (:meth:`RunContext.generation_engine`); judge every sample.

    Returns:
        The paths of ``generations.jsonl`` and ``judgements.jsonl`` under ``OUT/<name>/``, and the ``engine``
        that sampled them (also written to ``OUT/<name>/engine.json``).
    """
    from pairtrace.generation_engines import generate_with
    from pairtrace.judges.judging import judge_generations

    out_dir = ctx.path(name)
    prompt_records = read_jsonl(prompts)
    engine = ctx.generation_engine()
    records: list[dict[str, Any]] = []
    for model_name in models:
        records.extend(generate_with(ctx.generation_model(model_name), prompt_records,
                                     ctx.sampling(n_samples, seed_offset), model_name=model_name, engine=engine,
                                     progress=ctx.progress))
    gens = write_jsonl_atomic(records, out_dir / "generations.jsonl")
    write_json_atomic({"engine": engine, "models": models}, out_dir / "engine.json")
    judgements = out_dir / "judgements.jsonl"
    judgements.unlink(missing_ok=True)
    judge_generations(records, ctx.judge(), judgements, resume=False, progress=ctx.progress)
    return {"generations": str(gens), "judgements": str(judgements), "engine": engine}


def unit_key(ctx: RunContext, unit: RetrainUnit, rankings_key: str | None, sources_key: str | None) -> str:
    """What one retrain depends on: M0, the pairs, the recipe, the engine, the evaluation settings and prompts, its
    seed, and (for ranked selections) the rankings or (for a source ablation) the flagged models. The baseline and
    a random selection need neither key: they are planned before the rankings (and the organism's M1) exist."""
    exp = unit.experiment
    cfg = ctx.config
    selection: dict[str, Any] = {}
    if exp.selected_by is not None:
        stage_key = rankings_key if exp.selected_by == "rankings" else sources_key
        if stage_key is None:
            raise ValueError(f"retrain {unit.name} is selected by the {exp.selected_by} stage, which has no key yet")
        selection = {"ranking" if exp.selected_by == "rankings" else "sources": stage_key}
    if exp.method == "random":
        selection = {"random_seed": cfg.seed}
    return chain_key(ctx.pairs_digest(), exp.to_dict(), unit.seed, selection, cfg.validation.recipe,
                     cfg.validation.retrain.key_material(), ctx.m0_digest(), ctx.generation_key(),
                     cfg.judge.key_material(), file_digest(ctx.inputs.eval_prompts))


class RetrainQueue:
    """Retrains and evaluates the plan's units, each a cached stage of its own, starting each as soon as its
    inputs exist.

    With several workers, units go to worker processes (one thread each). Until :meth:`results` is called the
    main process still works (building M1, sampling, ranking, discovery), so the queue runs one unit fewer than it
    has workers and every core stays busy without sharing; then it runs as many as it has workers. With one worker
    the queue runs its units in the main process, in the order they were submitted, when :meth:`results` is
    called. On any exit every retrain that finished is recorded in the stage cache, so an interrupted or failed run
    keeps it.

        with RetrainQueue(ctx, workers=2) as queue:
            queue.submit(unranked_units, keys)   # the baseline, random selections: they start now
            ...                                  # M1, rankings, sources
            queue.submit(plan.units, keys)      # the rest (units submitted before are skipped)
            ...                                  # discovery, steering
            outcomes = queue.results()
    """

    def __init__(self, ctx: RunContext, workers: int, *, reference_cached: bool = False) -> None:
        self.ctx = ctx
        self.workers = workers
        self.reference_cached = reference_cached
        """M0's reference log-probabilities of every pair are in the cache already (the organism build's M1 pass
        wrote them), so no retrain has to run alone first (see :meth:`_fill`)."""
        self.outcomes: dict[str, Any] = {}
        self._keys: dict[str, str] = {}
        self._backlog: list[RetrainUnit] = []
        self._futures: dict[cf.Future, RetrainUnit] = {}
        self._recorded: set[cf.Future] = set()
        self._pool: cf.ProcessPoolExecutor | None = None
        self._limit = max(1, workers - 1)  # units running at once while the main process works
        self._lock = threading.RLock()  # the backlog is also filled from the pool's completion callbacks

    def __enter__(self) -> RetrainQueue:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def submit(self, units: Iterable[RetrainUnit], keys: dict[str, str]) -> None:
        """Queue units (a unit submitted before is skipped; a cached one is reused, not retrained)."""
        for unit in units:
            if unit.name in self._keys:
                if self._keys[unit.name] != keys[unit.name]:
                    raise ValueError(f"retrain {unit.name} was submitted twice with different inputs")
                continue
            self._keys[unit.name] = keys[unit.name]
            stamp = self.ctx.cache.reuse(f"retrain-{unit.name}", keys[unit.name])
            if stamp is not None:
                self.outcomes[unit.name] = stamp["result"]
            else:
                with self._lock:
                    self._backlog.append(unit)
        if self.workers > 1:
            self._fill()

    def results(self) -> dict[str, Any]:
        """Wait for every submitted unit, now with every worker (or run them here, with one); returns unit name ->
        outcome.

        Raises:
            Exception: The first failed retrain's error (finished retrains stay cached).
        """
        ctx = self.ctx
        if self.workers <= 1:
            while self._backlog:
                unit = self._backlog.pop(0)
                self.outcomes[unit.name] = ctx.cache.run(f"retrain-{unit.name}", self._keys[unit.name],
                                                         lambda unit=unit: retrain_and_evaluate(ctx, unit))
            return dict(self.outcomes)
        self._limit = self.workers
        while True:
            self._fill()
            with self._lock:
                running = [f for f in self._futures if not f.done()]
                finished = [f for f in self._futures if f.done() and f not in self._recorded]
                waiting = bool(self._backlog)
            for future in finished:
                self._record(future)
            if running:
                cf.wait(running, return_when=cf.FIRST_COMPLETED)
            elif not waiting and not finished:
                return dict(self.outcomes)

    def close(self) -> None:
        """Drop the units not started, stop the workers (running units finish) and record every finished one."""
        with self._lock:
            self._backlog.clear()
        if self._pool is None:
            return
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None
        for future in list(self._futures):
            if future.done() and not future.cancelled() and future.exception() is None:
                self._record(future)

    def _fill(self) -> None:
        """Start backlog units while fewer than the limit run (raises what the pool raises: a broken pool).

        The first unit runs alone: it fills M0's reference cache for its pairs in one pass before any other retrain
        reads it (two passes over different subsets of the pairs can differ in the last bit of a log-prob, which
        would make a retrain depend on the schedule), unless the cache holds every pair already.
        """
        with self._lock:
            first_running = (not self.reference_cached and bool(self._futures)
                             and not any(f.done() for f in self._futures))
            limit = 1 if first_running else self._limit
            while self._backlog and sum(not f.done() for f in self._futures) < limit:
                future = self._worker_pool().submit(_retrain_worker, self._state(), self._backlog[0])
                self._futures[future] = self._backlog.pop(0)
                future.add_done_callback(self._refill)

    def _refill(self, _finished: cf.Future) -> None:
        """The pool's completion callback: start the next units. It must not raise; a pool that cannot take them
        (broken, shut down) leaves them in the backlog, and :meth:`results` raises its error."""
        try:
            self._fill()
        except Exception as exc:
            logger.debug("retrain queue: no unit started after a finished one (%s)", exc)

    def _record(self, future: cf.Future) -> None:
        with self._lock:
            if future in self._recorded:
                return
            self._recorded.add(future)
        unit = self._futures[future]
        result, seconds = future.result()  # a failed retrain raises here
        self.ctx.cache.record(f"retrain-{unit.name}", self._keys[unit.name], seconds, result)
        logger.info("stage %-28s done in %.1f s", f"retrain-{unit.name}", seconds)
        self.outcomes[unit.name] = result

    def _worker_pool(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            logger.info("retraining in %d worker processes (1 thread each)", self.workers)
            self._pool = spawn_pool(self.workers)
        return self._pool

    def _state(self) -> dict[str, Any]:
        ctx = self.ctx
        return {"config": ctx.config.to_dict(), "out": str(ctx.out), "inputs": ctx.inputs.to_dict()}


def resolve_workers(requested: int | None, n_jobs: int) -> int:
    """How many retrains run at once: the configured number, or (None) one per CPU core on a CPU-only machine
    and one when a GPU is present."""
    if n_jobs <= 1:
        return 1
    if requested is None:
        import os

        import torch

        requested = 1 if torch.cuda.is_available() else max(1, (os.cpu_count() or 1))
    return max(1, min(int(requested), n_jobs))


def _retrain_worker(state: dict[str, Any], unit: RetrainUnit) -> tuple[dict[str, Any], float]:
    """Worker-process entry: rebuild the context from plain data and retrain + evaluate one unit."""
    import torch

    from pairtrace.experiment.run_config import build_run_config

    torch.set_num_threads(1)
    config = build_run_config(state["config"])
    ctx = RunContext(config, state["out"], progress=False, inputs=Inputs(**state["inputs"]), write_config=False)
    started = time.perf_counter()
    result = retrain_and_evaluate(ctx, unit)
    return json.loads(json.dumps(result, default=str)), time.perf_counter() - started


def build_training_data(ctx: RunContext, exp: Experiment) -> tuple[Path, dict[str, Any]]:
    """The modified mix of one experiment, in the layout DPO trains on, and the intervention's summary."""
    from pairtrace.attribute import load_ranking
    from pairtrace.data.pairs import load_pairs, pair_to_record
    from pairtrace.intervene import InterventionSpec, run_intervention

    source = ctx.inputs.pairs
    summary: dict[str, Any] = {}
    if exp.is_baseline:
        data_path = Path(source)
    else:
        int_dir = ctx.path("interventions", exp.name)
        if exp.method == "sources":
            spec = InterventionSpec(action="filter", selection="source", models=list(exp.models))
            summary = run_intervention(source, spec, int_dir, pairs=ctx.pairs())
        elif exp.method == "random":
            spec = InterventionSpec(action=exp.action, selection="random", k=exp.k, seed=ctx.config.seed)
            summary = run_intervention(source, spec, int_dir, pairs=ctx.pairs())
        else:
            spec = InterventionSpec(action=exp.action, selection="ranking", k=exp.k)
            summary = run_intervention(source, spec, int_dir, ranking=load_ranking(ctx.path("rankings", exp.method)),
                                       pairs=ctx.pairs())
        data_path = Path(summary["output"])
    if data_path.suffix == ".jsonl" and ctx.config.organism is not None:
        return data_path, summary
    # DPO trains on the mix layout: convert any input format through the core reader
    train_file = ctx.path("retrains", exp.name, "train.jsonl")
    write_jsonl_atomic([pair_to_record(p, "conversational") for p in load_pairs(data_path)], train_file)
    return train_file, summary


def retrain_and_evaluate(ctx: RunContext, unit: RetrainUnit) -> dict[str, Any]:
    """Build the unit's data, retrain from M0 with the run's engine, sample and judge the retrained model on the
    evaluation prompts, and summarise its evaluation."""
    from pairtrace.evaluate import evaluate_generations
    from pairtrace.experiment.results import summarise_evaluation
    from pairtrace.retrain.engines import RetrainRequest, get_retrainer, resolve_local_m0

    exp, name = unit.experiment, unit.name
    train_file, summary = build_training_data(ctx, exp)
    model_dir = ctx.path("retrains", name, "model")
    # Every retrain starts from M0: its reference log-probs of a (prompt, response) are computed once, keyed by
    # M0's weights and the tokenisation (switched pairs reuse both sides, filtered ones a subset).
    request = RetrainRequest(m0=resolve_local_m0(ctx.spec_of("m0")), train_file=train_file, model_dir=model_dir,
                             recipe=replace(ctx.config.validation.recipe, seed=unit.seed),
                             ref_cache_dir=Path(ctx.inputs.ref_cache), progress=ctx.progress,
                             options=ctx.config.validation.retrain)
    trained = get_retrainer(ctx.config.validation.retrain.engine)(request)
    ctx.register(name, ctx.model_spec(model_dir))
    gens = generate_and_judge(ctx, f"retrains/{name}", [name], ctx.inputs.eval_prompts,
                              ctx.config.generation.eval_samples, seed_offset=1)
    ctx.release(name)
    evaluation = evaluate_generations(read_jsonl(gens["generations"]), read_jsonl(gens["judgements"]))
    write_json_atomic(evaluation, ctx.path("retrains", name, "evaluation.json"))
    if not ctx.config.validation.keep_models:
        shutil.rmtree(model_dir, ignore_errors=True)
    return {
        "experiment": {**exp.to_dict(), "seed": unit.seed, "seeds": list(unit.seeds)},
        "metrics": summarise_evaluation(evaluation, name),
        "intervention": {k: summary.get(k) for k in ("removed", "switched", "n_selected", "changed_by")},
        "train": trained.to_dict(),
    }
