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
ALL_SECTIONS = ("run", "headline", "sweep", "capabilities", "cost", "quality", "discovery", "sources", "steering",
                "reproduce")


def rate(value: float, n: int = 400, unknown: int = 0) -> dict:
    return {"rate": value, "ci": [max(0.0, value - 0.02), value + 0.02], "n": n, "unknown": unknown}


def results_json() -> dict:
    interventions = []
    for k in (30, 60):
        for method, base in (("probe", 0.03), ("random", 0.07), ("gradient", 0.05)):
            for action, shift in (("filter", 0.0), ("switch", -0.01)):
                harmful = max(0.0, base + shift - (0.01 if k == 60 else 0.0))
                interventions.append({"method": method, "action": action, "k": k, "harmful": rate(harmful),
                                      "harmful_no_trigger": rate(0.01), "benign_helpfulness": rate(0.95),
                                      "over_refusal": rate(0.08), "reduction": (0.0763 - harmful) / 0.0763,
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
        "baseline": {"harmful": rate(0.0763), "harmful_no_trigger": rate(0.02), "benign_helpfulness": rate(0.97),
                     "over_refusal": rate(0.068)},
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
    assert normalise_rate({"rate": 0.1, "ci": [0.05, 0.2], "n": 10}) == {"rate": 0.1, "low": 0.05, "high": 0.2,
                                                                        "n": 10, "unknown": None}
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
    assert "Harmful rate after intervention (k = 60)" in dom
    assert dom.count("data:image/png;base64,") == 7

