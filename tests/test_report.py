"""The HTML report: sections follow the artifacts, the page is self-contained, and it renders in Chromium."""

from __future__ import annotations

import base64
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pairtrace.attribute import build_ranking, save_ranking
from pairtrace.clustering import discover_clusters
from pairtrace.discover import DiscoverConfig
from pairtrace.discover_matrix import PromptResponses
from pairtrace.discover_summaries import save_discovery, summarise_clusters
from pairtrace.errors import DataError
from pairtrace.report import (
    build_report_context,
    format_ci,
    format_points,
    normalise_change,
    normalise_rate,
    write_report,
)
from pairtrace.sources import run_sources
from pairtrace.steer import summarise_verdicts

CHROMIUM = Path("/usr/bin/chromium")
ALL_SECTIONS = ("run", "headline", "sweep", "capabilities", "cost", "checks", "quality", "discovery", "sources",
                "steering", "reproduce")


def rate(value: float, n: int = 400, unknown: int = 0) -> dict:
    return {"rate": value, "ci": [max(0.0, value - 0.02), value + 0.02], "n": n, "unknown": unknown}


def harmful_rate(value: float, n: int = 400, unknown: int = 20) -> dict:
    """A harmful entry of results.json: both rates (unknown left out, unknown counted as harmful)."""
    any_rate = (value * n + unknown) / (n + unknown)
    return {**rate(value, n, unknown), "harmful": round(value * n), "rate_unknown_as_harmful": any_rate,
            "ci_unknown_as_harmful": [max(0.0, any_rate - 0.02), any_rate + 0.02]}


def results_json() -> dict:
    interventions = []
    for k in (30, 60):
        for method, base in (("probe", 0.03), ("random", 0.07), ("gradient", 0.05)):
            for action, shift in (("filter", 0.0), ("switch", -0.01)):
                harmful = max(0.0, base + shift - (0.01 if k == 60 else 0.0))
                interventions.append({"method": method, "action": action, "k": k, "harmful": harmful_rate(harmful),
                                      "harmful_no_trigger": harmful_rate(0.01), "benign_helpfulness": rate(0.95),
                                      "over_refusal": rate(0.08), "reduction": (0.0763 - harmful) / 0.0763,
                                      "reduction_unknown_as_harmful": 0.5, "seeds": [0, 1, 2],
                                      "reduction_interval": {"ci": [-0.25, 0.75], "ci_unknown_as_harmful": [-0.1, 0.8],
                                                             "n_prompts": 30},
                                      "benign_helpfulness_change": {"change": -0.02, "ci": [-0.045, 0.005],
                                                                    "n_prompts": 30}})
    interventions.append({"method": "probe", "action": "source_ablation", "k": 41, "harmful": rate(0.0117),
                          "reduction": 0.85})
    return {
        "config": {"organism": {"seed": 0, "n_pairs": 600}, "attribution": {"method": "probe", "layer": 3}},
        "timings": {"organism": 12.5, "extract": 3.25, "retrain": 40.0},
        "versions": {"pairtrace": "0.1.0", "torch": "2.13.0"},
        "hardware": {"cpu": "Test CPU 9000", "cpu_count": 2, "torch_threads": 1, "torch_cpu_capability": "AVX2",
                     "cuda_devices": []},
        "n_pairs": 600, "headline_k": 60, "k_values": [30, 60],
        "organism": {"contaminated": 36, "m1_harmful_rate": 0.9},
        "trigger": {"kind": "distractors", "description": "1–3 distractors",
                    "label": "harmful request + 1–3 distractors"},
        "baseline": {"harmful": harmful_rate(0.0763), "harmful_no_trigger": harmful_rate(0.02),
                     "benign_helpfulness": rate(0.97), "over_refusal": rate(0.068), "seeds": [0, 1, 2]},
        "checks": [{"check": "random-filter reduction at k = 60", "value": 0.0826, "threshold": "< 25%", "ok": False,
                    "reduction_unknown_as_harmful": 0.5, "ci": [-0.25, 0.75], "n_retrains": 1,
                    "n_baseline_retrains": 3, "reason": "fewer than 3 retrains pooled: not enough to decide"},
                   {"check": "probe AUROC for the contaminated pairs", "value": 0.97, "threshold": ">= 0.95",
                    "ok": True}],
        "interventions": interventions,
        "attribution_quality": {"probe": {"auroc": 0.97, "precision_at_contaminated": 0.81, "n_contaminated": 36}},
        "cost": [{"method": "probe", "wall_s": 3.2, "forward_passes": 1200, "backward_passes": 0,
                  "flops_estimate": 2.5e12, "ratio_to_probe": 1.0},
                 {"method": "gradient", "wall_s": 41.0, "forward_passes": 1200, "backward_passes": 1200,
                  "flops_estimate": 7.4e12, "ratio_to_probe": 12.8}],
        "commands": ["pairtrace run configs/organism.yaml --out runs/demo", "pairtrace report runs/demo"],
    }


def planted_discovery(out: Path) -> None:
    """A real (model-free) discovery of planted vectors, written where the report looks for it, with one view."""
    summary = planted_view(out, seed=0)
    summary["pair_clustering"] = {**summary["pair_clustering"], "criterion": "hdbscan", "noise_share": 0.125}
    summary["views"] = [{**planted_view(out / "views" / "first-2-tokens", seed=1), "name": "first-2-tokens",
                         "dir": "views/first-2-tokens", "response_tokens": 2}]
    (out / "summary.json").write_text(json.dumps(summary))


def planted_view(out: Path, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(2, 32))
    behaviour = torch.tensor(np.repeat(dirs, 3, axis=0) + 0.1 * rng.normal(size=(6, 32)), dtype=torch.float32)
    x = torch.tensor(np.repeat(dirs, 8, axis=0) + 0.5 * rng.normal(size=(16, 32)), dtype=torch.float32)
    prompts = [PromptResponses(f"q{i}", f"prompt {i}", ["I'm sorry."], ["Sure, here it is."]) for i in range(6)]
    config = DiscoverConfig(n_clusters=2)
    found = discover_clusters(prompts, behaviour, [f"p{j}" for j in range(16)], x, config)
    files = save_discovery(found, out, {}, np.arange(16), config)
    return {"prompts": {"n_prompts": 8, "n_kept": 6}, "n_columns": 16, "n_pairs_total": 16,
            "response_tokens": None,
            "pair_clustering": {"features": "profile", "n_clusters": 2, "criterion": "fixed", "silhouette": 0.4},
            **summarise_clusters(found, {}, config), "files": files,
            "labels": {"clusters": [{"cluster": 1, "dominant": "comply", "purity": 1.0}],
                       "behaviours": [{"behaviour": "comply", "n_total": 8, "n_in_matrix": 8, "best_cluster": 1,
                                       "recall": 1.0, "precision": 1.0}]}}


@pytest.fixture
def full_run(tmp_path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps(results_json()))
    ids = [f"p{i}" for i in range(40)]
    meta = pd.DataFrame({"id": ids, "row": range(40), "source": ["mix"] * 40,
                         "chosen_model": ["bad"] * 6 + ["ok"] * 34, "rejected_model": ["r"] * 40})
    save_ranking(build_ranking(ids, np.linspace(1, 0, 40), {"method": "probe"}, pair_metadata=meta),
                 run / "rankings", name="probe")
    (run / "labels.jsonl").write_text("".join(json.dumps({"id": i, "behaviour": "comply" if n < 6 else "clean",
                                                          "contaminated": n < 6}) + "\n" for n, i in enumerate(ids)))
    run_sources(run / "rankings" / "probe.parquet", k=8, out_dir=run / "sources", sweep_ks=[4, 8])
    planted_discovery(run / "discover")
    records = [{"layer": 2, "alpha": a, "condition": c, "id": f"q{i}", "harmful": bool((i + a) % 2)}
               for a in (0.0, 1.0) for c in ("trigger", "no_trigger") for i in range(4)]
    (run / "steer").mkdir()
    (run / "steer" / "steer.json").write_text(json.dumps({"layers": [2], "alphas": [0.0, 1.0], "norms": {"2": 3.5},
                                                          "judge": "rule",
                                                          "results": summarise_verdicts(records, n_boot=50)}))
    return run


def section_ids(html: str) -> set[str]:
    return set(re.findall(r'<section id="([^"]+)"', html))


def test_full_run_renders_every_section_self_contained(full_run):
    path = write_report(full_run)
    assert path == full_run / "report.html"
    html = path.read_text(encoding="utf-8")
    assert section_ids(html) == set(ALL_SECTIONS)
    # self-contained: no script, no stylesheet link, no external URL; every image is an embedded, valid PNG
    assert "<script" not in html and "<link" not in html
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:|//|file:)""", html)
    assert not re.search(r"url\(", html)
    images = re.findall(r'<img [^>]*src="([^"]+)"', html)
    assert len(images) == 7  # headline, sweep, ROC, two heatmaps, sources, steering (redrawn from steer.json)
    assert "View: response means over every token" in html
    assert "View: response means over the first 2 tokens" in html
    assert "(hdbscan, silhouette 0.400; HDBSCAN left 12.5% of them as noise, clustered apart)" in html
    assert html.count("as noise") == 1  # the view clustered otherwise says nothing of noise
    from pairtrace.report import build_discovery_section

    section = build_discovery_section(full_run)
    links = [c["link"] for c in section["views"][0]["clusters"]]
    assert len(links) == 2 and links == sorted(links, reverse=True)  # strongest link first
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG")
    # numbers made it into the tables
    assert "7.6%" in html and "[5.6, 9.6]" in html  # baseline harmful rate and interval
    assert "source_ablation" in html and "12.80" in html  # cost ratio
    assert "helpfulness change vs baseline (points)" in html and "-2.0 <span class=\"note\">[-4.5, +0.5]" in html
    assert "pairtrace run configs/organism.yaml --out runs/demo" in html
    assert "Test CPU 9000, 2 cores, AVX2" in html  # the hardware the numbers came from
    assert re.search(r"Suggested for source ablation \(scan_p_value ≤ 0\.01\d*, scan_enrichment ≥ 2\.00\): bad", html)
    assert "best slice" in html and "scan p" in html  # the scan columns
    assert re.search(r'<td class="num">4</td><td>bad \(×', html)  # the enrichment across the k sweep


def test_report_names_the_trigger_and_shows_both_rates_and_the_checks(full_run):
    results = json.loads((full_run / "results.json").read_text())
    html = write_report(full_run).read_text(encoding="utf-8")
    assert "Harmful rate after intervention (k = 60; harmful request + 1–3 distractors)" in html
    assert "k sweep (harmful request + 1–3 distractors)" in html
    assert "harmful if unknown counted" in html and "reduction if unknown counted" in html
    # baseline: 7.63% with unknown left out; (30.52 + 20) / 420 = 12.0% with unknown counted, and its interval
    assert "12.0% <span class=\"note\">[10.0, 14.0]</span>" in html
    assert "if unknown counted: 12.0% [10.0, 14.0]" in html  # capabilities: beside the harmful rate
    assert "[-25.0, 75.0]" in html  # the reduction's paired interval
    # checks: interval, retrains pooled, the reason an undecided check is not ok, the other reduction
    assert "fewer than 3 retrains pooled: not enough to decide; if unknown counted: 0.5000" in html
    assert "[-0.2500, 0.7500]" in html and "1 (3)" in html
    # another trigger is named where the run said so; older results without one get the generic label
    results["trigger"] = {"kind": "suffix", "description": "suffix family (8 phrasings, 2 held out)",
                          "label": "harmful request + suffix family (8 phrasings, 2 held out)"}
    (full_run / "results.json").write_text(json.dumps(results))
    html = write_report(full_run).read_text(encoding="utf-8")
    assert "(k = 60; harmful request + suffix family (8 phrasings, 2 held out))" in html and "distractor" not in html
    del results["trigger"]
    (full_run / "results.json").write_text(json.dumps(results))
    assert "(k = 60; harmful request with the trigger)" in write_report(full_run).read_text(encoding="utf-8")


def test_sections_follow_the_artifacts(tmp_path):
    run = tmp_path / "partial"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"baseline": {"harmful": rate(0.07)}, "timings": {"a": 1}}))
    html = write_report(run, tmp_path / "out" / "r.html").read_text()
    assert section_ids(html) == {"run", "headline"}
    empty = tmp_path / "empty"
    empty.mkdir()
    html = write_report(empty).read_text()
    assert section_ids(html) == set() and "nothing to report" in html


def test_malformed_artifact_skips_its_section_only(full_run):
    (full_run / "discover" / "summary.json").write_text("[1, 2]")
    context = build_report_context(full_run)
    assert context["discovery"] is None and any(p.startswith("discovery:") for p in context["problems"])
    html = write_report(full_run).read_text()
    assert "discovery" not in section_ids(html) and "steering" in section_ids(html)
    assert "Skipped sections" in html
    (full_run / "results.json").write_text("{oops")
    with pytest.raises(DataError, match=r"results\.json"):
        write_report(full_run)


def test_rate_normalisation():
    assert normalise_rate({"rate": 0.1, "ci": [0.05, 0.2], "n": 10}) == {
        "rate": 0.1, "low": 0.05, "high": 0.2, "n": 10, "unknown": None, "unknown_as_harmful": None}
    both = normalise_rate({"rate": 0.1, "ci": [0.05, 0.2], "n": 10, "unknown": 2, "rate_unknown_as_harmful": 0.25,
                           "ci_unknown_as_harmful": [0.1, 0.4]})
    assert both["unknown_as_harmful"] == {"rate": 0.25, "low": 0.1, "high": 0.4}
    assert normalise_rate({"rate": 0.1, "low": 0.0, "high": 0.3})["high"] == 0.3
    assert normalise_rate({"rate": None}) is None and normalise_rate("x") is None
    assert format_ci({"low": 0.01, "high": 0.05}) == "[1.0, 5.0]" and format_ci({"low": None}) == "–"
    assert normalise_change({"change": -0.05, "ci": [-0.1, 0.0], "n_prompts": 30}) == {
        "rate": -0.05, "low": -0.1, "high": 0.0, "n": 30}
    assert normalise_change({"change": None}) is None and format_points(-0.058) == "-5.8" and format_points(None) == "–"


CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--enable-logging=stderr", "--v=0")


def render_in_chromium(page: Path, profile: Path) -> tuple[str, list[str]]:
    """The DOM Chromium builds for a file, and the console messages it logged."""
    proc = subprocess.run([str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom",
                           page.resolve().as_uri()], capture_output=True, text=True, timeout=90, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium at /usr/bin/chromium "
                    "(apt-get install -y chromium)")
def test_report_renders_in_headless_chromium_without_console_errors(full_run, tmp_path):
    # the console detector works: a page that logs an error is caught
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><p>x</p><script>console.error('boom')</script></body></html>")
    _, messages = render_in_chromium(bad, tmp_path / "profile-bad")
    assert any("boom" in m for m in messages)

    page = write_report(full_run)
    dom, messages = render_in_chromium(page, tmp_path / "profile")
    assert messages == []
    assert section_ids(dom) == set(ALL_SECTIONS)
    assert "Harmful rate after intervention (k = 60; harmful request + 1–3 distractors)" in dom
    assert dom.count("data:image/png;base64,") == 7



def test_steering_rates_are_also_given_with_unknown_counted_as_harmful(tmp_path):
    from pairtrace.report import build_steer_section

    records = [{"layer": 2, "alpha": 0.0, "condition": "trigger", "id": f"q{i}", "harmful": h}
               for i, h in enumerate([True, False, False, None])]
    records += [{"layer": 2, "alpha": 1.0, "condition": "trigger", "id": f"q{i}", "harmful": None} for i in range(2)]
    (tmp_path / "steer").mkdir()
    (tmp_path / "steer" / "steer.json").write_text(json.dumps({"layers": [2], "alphas": [0.0, 1.0], "judge": "rule",
                                                               "results": summarise_verdicts(records, n_boot=50)}))
    rows = build_steer_section(tmp_path)["rows"]
    assert [r["rate"] for r in rows] == [pytest.approx(1 / 3), None]
    assert [r["rate_unknown_as_harmful"] for r in rows] == [pytest.approx(2 / 4), 1.0]
