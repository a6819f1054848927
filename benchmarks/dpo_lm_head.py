"""DPO on the CPU with TRL's fused LM head against pairtrace's dense one, in the same process.

TRL's ``DPOTrainer`` scores tokens through a fused LM head that projects in tiles and folds them into running
log-sum-exp statistics (built for a GPU with Triton and a large vocabulary); on a CPU pairtrace swaps in a dense head
(``src/pairtrace/retrain/dense_head.py``): one matrix product and one ``log_softmax`` over the labelled positions.
This script trains the same DPO recipe from the same M0 on the same pairs with each head (``dpo.lm_head`` dense and
fused), alternating them
``--repeats`` times, and prints the training seconds of each (the median), their ratio, and how far the two runs end
apart (training loss, largest weight difference). Run::

    .venv/bin/python benchmarks/dpo_lm_head.py runs/organism/organism
    .venv/bin/python benchmarks/dpo_lm_head.py runs/organism/organism --pairs 480 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def train_once(organism: Path, pairs: Path, out: Path, dense: bool) -> tuple[float, dict]:
    """One DPO run with the organism's recipe; returns (seconds, summary). ``dense`` picks the LM head."""
    from dataclasses import replace

    from pairtrace.organism.build_config import load_organism_config
    from pairtrace.retrain.trl_dpo import train_dpo

    recipe = replace(load_organism_config(organism / "config.resolved.yaml").dpo, lm_head="dense" if dense else "fused")
    start = time.perf_counter()
    summary = train_dpo(organism / "m0", pairs, out, recipe, progress=False)
    return time.perf_counter() - start, summary


def max_weight_difference(a: Path, b: Path) -> float:
    """Largest absolute difference between two saved models' weights."""
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("organism", type=Path, help="A built organism folder (m0, data/preference_mix.jsonl).")
    parser.add_argument("--pairs", type=int, default=240, help="First N pairs of the mix (default 240).")
    parser.add_argument("--repeats", type=int, default=2, help="Runs per head, alternating (default 2).")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    lines = (args.organism / "data" / "preference_mix.jsonl").read_text(encoding="utf-8").splitlines()[: args.pairs]
    with tempfile.TemporaryDirectory(prefix="pairtrace-lm-head-") as tmp:
        pairs = Path(tmp) / "pairs.jsonl"
        pairs.write_text("\n".join(lines) + "\n", encoding="utf-8")
        seconds: dict[str, list[float]] = {"trl fused": [], "dense": []}
        summaries = {}
        for i in range(args.repeats):
            for name in seconds:
                took, summaries[name] = train_once(args.organism, pairs, Path(tmp) / name, dense=name == "dense")
                seconds[name].append(took)
                print(f"run {i + 1} {name}: {took:.1f} s ({summaries[name]['steps']} steps)", flush=True)
        fused, dense = (statistics.median(seconds[k]) for k in ("trl fused", "dense"))
        print(f"\n{len(lines)} pairs, {summaries['dense']['steps']} DPO steps, recipe {summaries['dense']['recipe']}")
        print(f"median seconds per run: TRL fused head {fused:.1f}, dense head {dense:.1f}: "
              f"{fused / dense:.2f}x faster with the dense head")
        print(f"training loss: fused {summaries['trl fused']['train_loss']:.6f}, "
              f"dense {summaries['dense']['train_loss']:.6f}; largest weight difference after training: "
              f"{max_weight_difference(Path(tmp) / 'trl fused', Path(tmp) / 'dense'):.2e}")


if __name__ == "__main__":
    main()
