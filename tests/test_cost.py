"""Cost records, the meter, the comparison table and parameter counting."""

from __future__ import annotations

import json
import time

import pytest

from pairtrace.cost import (
    CostMeter,
    CostRecord,
    cost_table,
    count_parameters,
    format_cost_table,
    load_costs,
    save_costs,
)
from pairtrace.errors import PairtraceError


def test_meter_counts_passes_tokens_and_flops():
    meter = CostMeter("probe", params_forward=100)
    meter.add_forward(tokens=30, passes=2)
    meter.add_forward(tokens=10, passes=1, params=50)
    meter.add_backward(tokens=5, passes=1, params=100)
    meter.add_flops(7)
    rec = meter.record()
    assert (rec.forward_passes, rec.backward_passes, rec.tokens_forward, rec.tokens_backward) == (3, 1, 40, 5)
    assert rec.flops_estimate == 2 * 100 * 30 + 2 * 50 * 10 + 4 * 100 * 5 + 7
    assert rec.method == "probe" and rec.model_calls == 0


def test_fork_starts_from_the_shared_work_and_then_counts_apart():
    shared = CostMeter("probe", params_forward=100)
    shared.add_forward(tokens=30, passes=2)
    shared.add_note("vectors")
    bank = shared.fork("bank")
    bank.add_forward(tokens=10, passes=1)
    bank.add_note("max over prompts")
    assert (shared.record().tokens_forward, bank.record().tokens_forward) == (30, 40)
    assert bank.record().method == "bank" and bank.record().flops_estimate == 2 * 100 * 40
    assert shared.notes == ["vectors"]


def test_unknown_parameter_count_makes_flops_unknown():
    meter = CostMeter("llm_judge")
    meter.add_calls(3, tokens=300)
    rec = meter.record()
    assert rec.flops_estimate is None
    assert (rec.model_calls, rec.forward_passes, rec.tokens_forward) == (3, 3, 300)
    sized = CostMeter("llm_judge")
    sized.add_calls(3, tokens=300, params=1000)
    assert sized.record().flops_estimate == 2 * 1000 * 300


def test_only_measured_blocks_are_timed():
    meter = CostMeter("gradient")
    start = time.perf_counter()
    time.sleep(0.05)  # e.g. model loading: not counted
    excluded = time.perf_counter() - start
    with meter.measure():
        time.sleep(0.02)
        with meter.measure():  # nested: timed once
            time.sleep(0.02)
    with meter:
        time.sleep(0.01)
    total = time.perf_counter() - start
    assert 0.05 <= meter.record().wall_s <= total - excluded + 1e-6


def test_cost_table_ratios_and_missing_reference():
    probe = CostRecord("probe", wall_s=2.0, tokens_forward=100, flops_estimate=1e9)
    grad = CostRecord("gradient", wall_s=30.0, tokens_forward=500, tokens_backward=300, flops_estimate=2.5e10)
    judge = CostRecord("llm_judge", wall_s=50.0, tokens_forward=4000, flops_estimate=None, model_calls=20)
    rows = cost_table([probe, grad, judge], reference="probe")
    by = {r["method"]: r for r in rows}
    assert by["probe"]["wall_ratio"] == 1.0 and by["gradient"]["wall_ratio"] == 15.0
    assert by["gradient"]["flops_ratio"] == 25.0 and by["gradient"]["tokens_ratio"] == 8.0
    assert by["llm_judge"]["flops_ratio"] is None and by["llm_judge"]["wall_ratio"] == 25.0
    assert all(r["reference"] == "probe" for r in rows)
    no_ref = cost_table([grad], reference="probe")
    assert no_ref[0]["wall_ratio"] is None and no_ref[0]["flops_ratio"] is None
    text = format_cost_table(rows)
    assert "n/a" in text and "gradient" in text and "15.0" in text


def test_save_and_load_round_trip(tmp_path):
    records = [CostRecord("probe", wall_s=1.5, forward_passes=4, tokens_forward=99, flops_estimate=3.0, notes="x"),
               CostRecord("llm_judge", flops_estimate=None, model_calls=3)]
    path = save_costs(records, tmp_path / "costs.json")
    assert load_costs(path) == records
    (tmp_path / "bad.json").write_text(json.dumps([{"method": "probe", "speed": 3}]))
    with pytest.raises(PairtraceError, match="speed"):
        load_costs(tmp_path / "bad.json")
    with pytest.raises(PairtraceError, match="no cost records"):
        load_costs(tmp_path / "missing.json")


def test_count_parameters_counts_the_layers_run(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    blocks = model.model.layers
    per_block = sum(p.numel() for p in blocks[0].parameters())
    head = model.lm_head.weight.numel()
    assert count_parameters(model, n_layers=2, include_head=False) == 2 * per_block
    assert count_parameters(model) == len(blocks) * per_block + head
    embed, norm = model.model.embed_tokens.weight.numel(), model.model.norm.weight.numel()
    assert count_parameters(model) == sum(p.numel() for p in model.parameters()) - embed - norm
    assert count_parameters(model.model.layers) == sum(p.numel() for p in model.model.layers.parameters())
