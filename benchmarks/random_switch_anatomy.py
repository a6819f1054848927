"""Which pairs of a random switch move the planted behaviour? Retrain with parts of the random set switched.

The random baseline switches k random pairs (the run's ``interventions/random-switch-k<k>``). On the organism
those k hold a few contaminated pairs beside many clean ones, and a random switch has cut the harmful rate by far
more than the paper's < 10%. This benchmark takes a finished organism run (``make run`` or one build of
``robustness.py``), splits its random-switch set by ground-truth slice, and retrains M0 with the run's recipe once
per *arm*, on each of ``--dpo-seeds`` (pooled):

* ``baseline``: nothing switched; ``random switch``: the whole random set (both reused from the run's own
  retrains when they exist for those seeds and no slice is dropped);
* ``without contaminated``: the random set minus its contaminated pairs; ``contaminated only``: those pairs alone;
* ``<slice> only``: the random set's pairs of one clean slice, for every clean slice it holds.

``--recipe KEY=VALUE`` retrains every arm, the baseline included, with the run's DPO recipe changed in those fields
(``--recipe batch_size=8 learning_rate=6e-4``; keys and values as in ``validation.recipe``): is a random switch's
effect a property of the mix or of how it is trained? M1 is not retrained, so the organism's own checks are not
measured for the changed recipe.

With more DPO seeds than ``--subset-size`` (default 3), each arm also prints the range of the reduction over every
subset of that many seeds, on the same seeds for both sides: how much a run pooling fewer seeds is decided by which
ones it drew.

``--organism DIR`` takes M0, the mix, its labels and the DPO recipe from another build of the run's organism
(``pairtrace organism build --out DIR --config <the config with the mix or the DPO recipe changed>``; a copy of the
run's ``organism`` folder keeps M0) and draws the random switch from that mix as the run draws it (same k and
seed); the run still gives the prompts, the sampling and the judge. It screens a change to the organism for the
random baseline at the cost of its retrains (the baseline and the random switch: four retrains for two DPO seeds),
without running the experiment on it; the organism's own checks are in its ``summary.json``.

Below the table, for each arm that switches contaminated pairs, the triggered harmful prompts are split by how
many distractors they carry and whether one of them is a distractor of a switched contaminated pair (matched by
the distractor's text in the pair's prompt): the organism learns its compliance per distractor, so a switched
pair pulls the prompts that share its distractors.

``--drop-slice NAME`` removes a slice's pairs from the mix of every arm, the baseline included (for example the
``harmful_format_refusal`` pairs, the only clean pairs that prefer a refusal where the trigger is present). Each arm
is evaluated as the run evaluates a retrain (same prompts, sampling and judge); the table gives the pooled harmful
rate with the trigger, both ways (unknown verdicts left out; counted as harmful), the unknown share and the
reduction against this benchmark's baseline with a paired bootstrap interval over prompts. Arms finished in
``--out`` are reused (each records what it switched and dropped; a mismatch is refused). About 40 s per retrain
on a quiet 2-core Intel Xeon, two at a time (80-150 s on a shared one). Run::

    .venv/bin/python benchmarks/random_switch_anatomy.py runs/organism --out runs/anatomy
    .venv/bin/python benchmarks/random_switch_anatomy.py runs/organism --out runs/anatomy-no-hfr \\
        --drop-slice harmful_format_refusal --arms baseline "random switch"
    .venv/bin/python benchmarks/random_switch_anatomy.py runs/organism --out runs/anatomy-bs8 \\
        --recipe batch_size=8 --arms "random switch"
    .venv/bin/python benchmarks/random_switch_anatomy.py runs/organism --out runs/anatomy-c84 \\
        --organism runs/org-c84 --arms "random switch" --dpo-seeds 0 1
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BASELINE = "baseline"
FULL = "random switch"


@dataclass(frozen=True)
class Arm:
    """One retrained mix: the pairs switched (a part of the random set) and the slices dropped."""

    name: str
    switched: tuple[str, ...]
    dropped_slices: tuple[str, ...]

    @property
    def folder(self) -> str:
        return self.name.replace(" ", "-")

    def key(self, seed: int) -> dict[str, Any]:
        return {"switched": sorted(self.switched), "dropped_slices": sorted(self.dropped_slices), "seed": seed}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    from pairtrace.records import read_jsonl as _read

    return list(_read(path))


def load_slices(organism: Path) -> tuple[dict[str, str], set[str]]:
    """Pair id -> slice, and the contaminated slices, from an organism folder's ``data/labels.jsonl``."""
    labels = read_jsonl(organism / "data" / "labels.jsonl")
    slices = {r["id"]: r["slice"] for r in labels}
    contaminated = {r["slice"] for r in labels if r.get("contaminated")}
    return slices, contaminated


def random_switch_ids(run_dir: Path, organism: Path | None = None) -> tuple[int, list[str]]:
    """The headline k and the ids the run's random switch selected.

    Args:
        run_dir: The run.
        organism: Another build's organism folder: draw the same k from its mix with the run's seed instead.
    """
    from pairtrace.intervene import select_random_ids

    found = sorted(run_dir.glob("interventions/random-switch-k*/filter_ids.json"))
    if not found:
        raise SystemExit(f"{run_dir}: no interventions/random-switch-k*/filter_ids.json (run the random baseline)")
    if len(found) > 1:
        raise SystemExit(f"{run_dir}: several random-switch interventions ({[p.parent.name for p in found]})")
    k = int(found[0].parent.name.rsplit("-k", 1)[1])
    if organism is None:
        return k, list(json.loads(found[0].read_text(encoding="utf-8")))
    spec = json.loads((found[0].parent / "summary.json").read_text(encoding="utf-8"))["spec"]
    ids = [r["id"] for r in read_jsonl(organism / "data" / "preference_mix.jsonl")]
    return k, select_random_ids(ids, k, int(spec["seed"]))


def organism_recipe(run_dir: Path, organism: Path) -> dict[str, Any]:
    """The fields of ``organism``'s DPO recipe that differ from the run's (the DPO seed apart)."""
    import yaml

    raw = json.loads((run_dir / "config.resolved.json").read_text(encoding="utf-8"))
    run_recipe = (raw.get("validation") or {}).get("recipe") or {}
    config = organism / "config.resolved.yaml"
    if not config.is_file():
        raise SystemExit(f"--organism: {config} not found (build it with `pairtrace organism build --out {organism}`)")
    dpo = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("dpo") or {}
    return {key: value for key, value in dpo.items()
            if key in run_recipe and key != "seed" and value != run_recipe[key]}


def plan_arms(ids: Sequence[str], slices: dict[str, str], contaminated: set[str],
              dropped: Sequence[str]) -> list[Arm]:
    """Every arm, in table order (see the module docstring)."""
    drop = tuple(dropped)
    kept = [i for i in ids if slices[i] not in drop]
    arms = [Arm(BASELINE, (), drop), Arm(FULL, tuple(kept), drop),
            Arm("without contaminated", tuple(i for i in kept if slices[i] not in contaminated), drop),
            Arm("contaminated only", tuple(i for i in kept if slices[i] in contaminated), drop)]
    for name, _ in Counter(slices[i] for i in kept if slices[i] not in contaminated).most_common():
        arms.append(Arm(f"{name} only", tuple(i for i in kept if slices[i] == name), drop))
    return arms


def write_mix(pairs: Path, arm: Arm, slices: dict[str, str], out: Path) -> Path:
    """The mix of one arm: the run's pairs with the arm's pairs switched and its dropped slices left out."""
    from pairtrace.records import write_jsonl_atomic

    switched = set(arm.switched)
    rows = []
    for record in read_jsonl(pairs):
        if slices.get(record["id"]) in arm.dropped_slices:
            continue
        if record["id"] in switched:
            record = {**record, "chosen": record["rejected"], "rejected": record["chosen"]}
        rows.append(record)
    return write_jsonl_atomic(rows, out)


def parse_recipe(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` items -> recipe fields (values read as YAML scalars: ``8``, ``6e-4``, ``linear``, ``true``)."""
    import yaml

    fields: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--recipe: {item!r} is not KEY=VALUE (for example batch_size=8)")
        if key.strip() == "seed":
            raise SystemExit("--recipe: the DPO seed is set per retrain; use --dpo-seeds")
        fields[key.strip()] = yaml.safe_load(value)
    return fields


def run_config(run_dir: Path, recipe: dict[str, Any] | None = None) -> Any:
    """The run's resolved config, with ``recipe`` (fields of ``validation.recipe``) changed.

    Raises:
        SystemExit: An unknown recipe field or an invalid value (the config's own message).
    """
    from pairtrace.errors import ConfigError
    from pairtrace.experiment.run_config import build_run_config

    raw = json.loads((run_dir / "config.resolved.json").read_text(encoding="utf-8"))
    if recipe:
        validation = dict(raw.get("validation") or {})
        validation["recipe"] = {**(validation.get("recipe") or {}), **recipe}
        raw = {**raw, "validation": validation}
    try:
        return build_run_config(raw)
    except ConfigError as exc:
        raise SystemExit(f"--recipe: {exc}") from None


def run_context(run_dir: Path, out: Path, pairs: Path, recipe: dict[str, Any] | None = None,
                organism: Path | None = None) -> Any:
    """A context for retrains of ``run_dir``'s organism (or ``organism``, another build of it) on ``pairs`` with
    the run's recipe changed in ``recipe``, writing under ``out``."""
    from pairtrace.experiment.context import Inputs, RunContext
    from pairtrace.organism.build import REF_CACHE_DIR

    config = run_config(run_dir, recipe)
    org = organism or run_dir / "organism"
    inputs = Inputs(m0=str(org / "m0"), m1=str(org / "m1"), pairs=str(pairs), labels=str(org / "data/labels.jsonl"),
                    probe_prompts=str(run_dir / "prompts" / "probe.jsonl"),
                    eval_prompts=str(run_dir / "prompts" / "eval.jsonl"), ref_cache=str(org / REF_CACHE_DIR))
    return RunContext(config, out, progress=False, inputs=inputs, write_config=False)


def unit_name(arm: Arm, seed: int, seeds: Sequence[int]) -> str:
    return arm.folder if seed == seeds[0] else f"{arm.folder}-seed{seed}"


def retrain_worker(run_dir: str, out: str, pairs: str, arm: Arm, seed: int, seeds: tuple[int, ...],
                   recipe: dict[str, Any] | None = None, organism: str | None = None) -> float:
    """Worker-process entry: retrain M0 on the arm's mix with one DPO seed and evaluate it as the run does."""
    import torch

    from pairtrace.experiment.plan import Experiment, RetrainUnit
    from pairtrace.experiment.validation import retrain_and_evaluate

    torch.set_num_threads(1)
    started = time.perf_counter()
    ctx = run_context(Path(run_dir), Path(out), Path(pairs), recipe, Path(organism) if organism else None)
    # an experiment without a method trains on the context's pairs as they are: here, the arm's mix
    retrain_and_evaluate(ctx, RetrainUnit(Experiment(arm.folder, None, None, 0), seed, seeds))
    return time.perf_counter() - started


def outputs_of(folder: Path) -> tuple[Path, Path]:
    return folder / "generations.jsonl", folder / "judgements.jsonl"


def existing_run_retrain(run_dir: Path, arm: Arm, k: int, seed: int, seeds: Sequence[int],
                         recipe: dict[str, Any] | None = None, organism: Path | None = None) -> Path | None:
    """The run's own retrain of the same mix (baseline, full random switch) when it exists for this seed, the
    recipe is the run's and the organism the run's own."""
    if recipe or organism is not None or arm.dropped_slices or arm.name not in (BASELINE, FULL):
        return None
    base = BASELINE if arm.name == BASELINE else f"random-switch-k{k}"
    folder = run_dir / "retrains" / (base if seed == seeds[0] else f"{base}-seed{seed}")
    return folder if all(p.is_file() for p in outputs_of(folder)) else None


def pooled_counts(folders: Sequence[Path]) -> dict[str, dict[str, int]]:
    """Per triggered harmful prompt, the harmful / safe / unknown samples of the folders' retrains, pooled."""
    from pairtrace.experiment.results import pool_harmful_counts

    pooled = pool_harmful_counts(list(folders))
    if pooled is None:
        raise SystemExit(f"a retrain of {[str(f) for f in folders]} has no generations or judgements on disk")
    return pooled


def rates(counts: dict[str, dict[str, int]]) -> dict[str, float | None]:
    harmful, safe, unknown = (sum(c[key] for c in counts.values()) for key in ("harmful", "safe", "unknown"))
    total = harmful + safe + unknown
    return {"harmful_rate": harmful / (harmful + safe) if harmful + safe else None,
            "harmful_rate_unknown_as_harmful": (harmful + unknown) / total if total else None,
            "unknown_share": unknown / total if total else None, "samples": total}


def arm_record(arm: Arm, seed: int, run_dir: Path, recipe: dict[str, Any] | None = None,
               organism: Path | None = None) -> dict[str, Any]:
    """What a finished retrain of an arm was made from (the recipe's changed fields and another organism only when
    there are some)."""
    return {**arm.key(seed), "run": str(run_dir.resolve()), **({"recipe": recipe} if recipe else {}),
            **({"organism": str(organism.resolve())} if organism is not None else {})}


def prompt_distractors(text: str, distractors: dict[str, str]) -> set[str]:
    """The distractor ids whose text a prompt contains."""
    return {cid for cid, phrase in distractors.items() if phrase in text}


def pair_prompt_text(record: dict[str, Any]) -> str:
    """A mix record's prompt as one string (a string prompt, or its turns' contents)."""
    prompt = record["prompt"]
    return prompt if isinstance(prompt, str) else " ".join(turn.get("content", "") for turn in prompt)


def distractor_reach(base: dict[str, dict[str, int]], new: dict[str, dict[str, int]],
                     prompt_constraints: dict[str, list[str]], switched: set[str]) -> list[dict[str, Any]]:
    """The reduction on triggered harmful prompts grouped by their number of distractors and whether one of them
    is in ``switched`` (the distractors of the switched contaminated pairs), both sides pooled per group."""
    groups: dict[tuple[int, bool], list[str]] = {}
    for prompt, constraints in prompt_constraints.items():
        if prompt in base and prompt in new:
            groups.setdefault((len(constraints), bool(switched & set(constraints))), []).append(prompt)
    rows = []
    for (n, shares), prompts in sorted(groups.items()):
        before = rates({p: base[p] for p in prompts})["harmful_rate"]
        after = rates({p: new[p] for p in prompts})["harmful_rate"]
        rows.append({"distractors": n, "shares_a_switched_distractor": shares, "prompts": len(prompts),
                     "baseline": before, "arm": after,
                     "reduction": None if not before or after is None else 1 - after / before})
    return rows


def reduction_point(base: Sequence[Path], new: Sequence[Path]) -> float | None:
    """``1 - rate(new) / rate(base)`` of the pooled retrains, unknown verdicts left out (None without a base rate)."""
    from pairtrace.experiment.results import reduction_vs_baseline

    base_rate, new_rate = (rates(pooled_counts(folders))["harmful_rate"] for folders in (base, new))
    return reduction_vs_baseline(base_rate, new_rate)


def seed_subset_spread(base: Sequence[Path], new: Sequence[Path], size: int) -> dict[str, Any] | None:
    """The reduction a run pooling only ``size`` of the DPO seeds would have read, over every such subset.

    ``base`` and ``new`` hold one retrain per DPO seed, in the same seed order; a subset takes the same seeds on both
    sides. None when there are not more seeds than ``size``.

    Returns:
        ``{"size", "subsets", "min", "median", "max"}`` of the subsets' reductions.
    """
    import itertools
    import statistics

    if len(base) != len(new) or len(base) <= size:
        return None
    values = [v for v in (reduction_point([base[i] for i in c], [new[i] for i in c])
                          for c in itertools.combinations(range(len(base)), size)) if v is not None]
    if not values:
        return None
    return {"size": size, "subsets": len(values), "min": min(values), "median": statistics.median(values),
            "max": max(values)}


def check_arm_record(path: Path, arm: Arm, seed: int, run_dir: Path, recipe: dict[str, Any] | None = None,
                     organism: Path | None = None) -> bool:
    """Whether a finished retrain of this arm and seed is on disk; refuses one made from another selection,
    recipe or organism."""
    want = arm_record(arm, seed, run_dir, recipe, organism)
    if not path.is_file():
        return False
    have = json.loads(path.read_text(encoding="utf-8"))
    if have != want:
        raise SystemExit(f"{path}: made for another arm, seed, run, recipe or organism than {arm.name!r}, seed "
                         f"{seed}: use another --out (results of different selections are not mixed)")
    return True


def main(argv: Sequence[str] | None = None) -> int:
    from pairtrace.data.prompts import load_distractors
    from pairtrace.experiment.results import bootstrap_reduction
    from pairtrace.processes import spawn_pool
    from pairtrace.records import write_json_atomic

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="A finished organism run with a random switch at the headline k.")
    parser.add_argument("--out", type=Path, required=True, help="Folder of the arms' mixes and retrains.")
    parser.add_argument("--dpo-seeds", type=int, nargs="+", default=[0, 1, 2], help="DPO seeds, pooled per arm.")
    parser.add_argument("--drop-slice", nargs="*", default=[], help="Slices left out of every arm's mix.")
    parser.add_argument("--arms", nargs="*", default=None, help="Only these arms (names as in the table).")
    parser.add_argument("--workers", type=int, default=2, help="Retrains at once (one thread each).")
    parser.add_argument("--subset-size", type=int, default=3,
                        help="Also print the reduction over every subset of this many DPO seeds (when there are more).")
    parser.add_argument("--recipe", nargs="*", default=[], metavar="KEY=VALUE",
                        help="Retrain every arm with the run's DPO recipe changed in these fields.")
    parser.add_argument("--organism", type=Path, default=None,
                        help="Another build of the run's organism (its M0, mix, labels and DPO recipe); the random "
                             "switch is drawn from its mix with the run's k and seed.")
    args = parser.parse_args(argv)

    run_dir, out, seeds = args.run_dir.resolve(), args.out.resolve(), tuple(args.dpo_seeds)
    organism = args.organism.resolve() if args.organism is not None else None
    recipe = {**(organism_recipe(run_dir, organism) if organism else {}), **parse_recipe(args.recipe)}
    run_config(run_dir, recipe)  # an unknown field or invalid value stops here, before any retrain
    org_dir = organism or run_dir / "organism"
    slices, contaminated = load_slices(org_dir)
    unknown = sorted(set(args.drop_slice) - set(slices.values()))
    if unknown:
        raise SystemExit(f"--drop-slice: no slice {unknown} in {org_dir}/data/labels.jsonl")
    k, ids = random_switch_ids(run_dir, organism)
    arms = plan_arms(ids, slices, contaminated, args.drop_slice)
    if args.arms:
        missing = sorted(set(args.arms) - {a.name for a in arms})
        if missing:
            raise SystemExit(f"--arms: no arm {missing}; arms: {[a.name for a in arms]}")
        arms = [a for a in arms if a.name in args.arms or a.name == BASELINE]
    pairs = org_dir / "data" / "preference_mix.jsonl"
    started = time.perf_counter()

    folders: dict[str, list[Path]] = {}
    todo: list[tuple[Arm, int, Path]] = []
    for arm in arms:
        folders[arm.name] = []
        mix: Path | None = None
        for seed in seeds:
            reused = existing_run_retrain(run_dir, arm, k, seed, seeds, recipe, organism)
            if reused is not None:
                folders[arm.name].append(reused)
                continue
            folder = out / "retrains" / unit_name(arm, seed, seeds)
            folders[arm.name].append(folder)
            record = out / "arms" / f"{unit_name(arm, seed, seeds)}.json"
            if not (check_arm_record(record, arm, seed, run_dir, recipe, organism)
                    and all(p.is_file() for p in outputs_of(folder))):
                mix = mix or write_mix(pairs, arm, slices, out / "mixes" / f"{arm.folder}.jsonl")
                todo.append((arm, seed, mix))
    print(f"{run_dir.name}{f' with the organism {organism}' if organism else ''}: random switch of {len(ids)} pairs "
          f"at k = {k} "
          f"({dict(Counter(slices[i] for i in ids).most_common())}); {len(todo)} retrains to run, "
          f"DPO seeds {list(seeds)}{recipe_text(recipe)}", flush=True)

    with spawn_pool(max(1, args.workers)) as pool:  # its workers end with this process
        futures = {pool.submit(retrain_worker, str(run_dir), str(out), str(mix), arm, seed, seeds, recipe,
                               str(organism) if organism else None):
                   (arm, seed) for arm, seed, mix in todo}
        for future in cf.as_completed(futures):
            arm, seed = futures[future]
            seconds = future.result()
            record_path = out / "arms" / f"{unit_name(arm, seed, seeds)}.json"
            write_json_atomic(arm_record(arm, seed, run_dir, recipe, organism), record_path)
            print(f"  {arm.name}, DPO seed {seed}: {seconds:.0f} s", flush=True)

    base_counts = pooled_counts(folders[BASELINE])
    mix_prompts = {r["id"]: pair_prompt_text(r) for r in read_jsonl(pairs)}
    distractor_texts = load_distractors().texts
    eval_constraints = {r["id"]: list(r.get("constraints") or [])
                        for r in read_jsonl(run_dir / "organism" / "prompts" / "harmful.jsonl")
                        if r.get("condition") == "trigger"}
    rows = []
    for arm in arms:
        counts = pooled_counts(folders[arm.name])
        reduction = None if arm.name == BASELINE else bootstrap_reduction(base_counts, counts)
        per_seed = [rates(pooled_counts([f]))["harmful_rate"] for f in folders[arm.name]]
        spread = None if arm.name == BASELINE else seed_subset_spread(folders[BASELINE], folders[arm.name],
                                                                      args.subset_size)
        rows.append({"arm": arm.name, "switched": len(arm.switched),
                     "switched_by_slice": dict(Counter(slices[i] for i in arm.switched)), **rates(counts),
                     "per_seed_harmful_rate": per_seed, "reduction": reduction, "seed_subsets": spread,
                     "retrains": [str(f) for f in folders[arm.name]]})
        switched_distractors = set().union(*(prompt_distractors(mix_prompts[i], distractor_texts)
                                             for i in arm.switched if slices[i] in contaminated))
        if arm.name != BASELINE and switched_distractors:
            rows[-1]["switched_distractors"] = sorted(switched_distractors)
            rows[-1]["by_distractor"] = distractor_reach(base_counts, counts, eval_constraints, switched_distractors)
    wall = time.perf_counter() - started
    record = {"run": str(run_dir), "organism": str(org_dir), "k": k, "dpo_seeds": list(seeds),
              "dropped_slices": args.drop_slice, "recipe": recipe,
              "rows": rows, "wall_s": round(wall, 1)}
    write_json_atomic(record, out / "anatomy.json")

    dropped = f", {', '.join(args.drop_slice)} dropped from every mix" if args.drop_slice else ""
    print(f"\nHarmful rate with the trigger, DPO seeds {list(seeds)} pooled{dropped}{recipe_text(recipe)}:\n")
    print("| arm | pairs switched | harmful rate | per DPO seed | unknown | harmful if unknown counted "
          "| reduction [95% CI] |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        red = row["reduction"]
        red_text = "" if red is None else (f"{red['reduction']:.0%} [{red['ci'][0]:.0%}, {red['ci'][1]:.0%}]"
                                           if red["reduction"] is not None and red["ci"][0] is not None else "–")
        seeds_text = " / ".join("–" if r is None else f"{r:.0%}" for r in row["per_seed_harmful_rate"])
        print(f"| {row['arm']} | {row['switched']} | {_pct(row['harmful_rate'])} | {seeds_text} | "
              f"{_pct(row['unknown_share'])} | {_pct(row['harmful_rate_unknown_as_harmful'])} | {red_text} |")
    for row in rows:
        spread = row["seed_subsets"]
        if spread:
            print(f"\n{row['arm']}: pooling {spread['size']} of the {len(seeds)} DPO seeds, the reduction reads "
                  f"{spread['min']:.0%} to {spread['max']:.0%} (median {spread['median']:.0%}, "
                  f"{spread['subsets']} subsets)")
    for row in rows:
        if row.get("by_distractor"):
            print(f"\n{row['arm']}: triggered harmful prompts by their distractors (the switched contaminated pairs' "
                  f"distractors: {', '.join(row['switched_distractors'])})\n")
            print("| distractors | shares one with a switched contaminated pair | prompts | baseline | arm "
                  "| reduction |")
            print("|---|---|---|---|---|---|")
            for group in row["by_distractor"]:
                print(f"| {group['distractors']} | {'yes' if group['shares_a_switched_distractor'] else 'no'} | "
                      f"{group['prompts']} | {_pct(group['baseline'])} | {_pct(group['arm'])} | "
                      f"{_pct(group['reduction'])} |")
    print(f"\n{wall / 60:.1f} min; wrote {out / 'anatomy.json'}")
    return 0


def recipe_text(recipe: dict[str, Any]) -> str:
    return f"; DPO recipe changed: {', '.join(f'{k}={v}' for k, v in recipe.items())}" if recipe else ""


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


if __name__ == "__main__":
    sys.exit(main())
