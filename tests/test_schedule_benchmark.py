"""benchmarks/schedule.py: its run configs, and the comparison of two runs' results without their times."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from testing_utils import benchmark_module

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def schedule():
    with benchmark_module("schedule.py", "schedule") as module:
        yield module


def test_each_schedule_gets_the_config_with_its_overlap_and_an_absolute_organism(schedule, tmp_path: Path) -> None:
    for overlap in (False, True):
        path = schedule.write_config(CONFIGS / "organism-quick.yaml", overlap, tmp_path)
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert data["validation"]["overlap"] is overlap
        assert Path(data["organism"]).is_absolute() and Path(data["organism"]).is_file()
        assert data["validation"]["parallel_retrains"] == 2  # everything else as the config says


def test_results_are_compared_without_times_and_run_folders(schedule) -> None:
    def results(run: str, wall: float, rate: float) -> dict:
        return {"timings": {"rankings": wall}, "checks": [{"value": wall}],
                "baseline": {"harmful": {"rate": rate}, "path": f"{run}/retrains/baseline"},
                "interventions": [{"name": "probe-switch-k96", "train": {"seconds": wall}, "rate": rate / 2}]}

    a = schedule.comparable(results("/x/sequential-0", 10.0, 0.8), "/x/sequential-0")
    b = schedule.comparable(results("/x/overlap-0", 7.0, 0.8), "/x/overlap-0")
    assert schedule.differences(a, b) == []
    c = schedule.comparable(results("/x/overlap-0", 7.0, 0.7), "/x/overlap-0")
    assert schedule.differences(a, c) == ["/baseline/harmful/rate", "/interventions[0]/rate"]
    assert schedule.differences({"a": 1}, {"b": 1}) == ["/a", "/b"]
    assert schedule.differences([1, 2], [1]) == ["/"]
