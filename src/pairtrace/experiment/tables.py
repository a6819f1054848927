"""The Markdown tables of a run (``tables.md``), mirroring the paper: Figure 1, the k sweep, capabilities, the
cost of attribution, the checks, attribution quality, discovery and source enrichment. The HTML report
(:mod:`pairtrace.report`) is drawn from the same ``results.json``."""

from __future__ import annotations

from typing import Any


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _rate_cell(m: dict[str, Any] | None) -> str:
    if not m or m.get("rate") is None:
        return "n/a"
    lo, hi = (m.get("ci") or [None, None])[:2]
    if lo is None or hi is None:
        return _pct(m["rate"])
    return f"{_pct(m['rate'])} [{_pct(lo)}, {_pct(hi)}]"


def _seed_cell(row: dict[str, Any], key: str, seeded: bool) -> str:
    """The table cell (with its trailing bar) of each DPO seed's rate; empty when the run has one seed."""
    if not seeded:
        return ""
    per_seed = row.get("per_seed") or []
    return f" {' · '.join(_pct(s.get(key)) for s in per_seed) if len(per_seed) > 1 else 'one seed'} |"


def _change_cell(m: dict[str, Any] | None) -> str:
    """A change of rates in points with its interval, e.g. ``-5.8 [-10.0, -1.7]``."""
    if not m or m.get("change") is None:
        return "n/a"
    lo, hi = (m.get("ci") or [None, None])[:2]
    text = f"{100 * m['change']:+.1f}"
    return text if lo is None or hi is None else f"{text} [{100 * lo:+.1f}, {100 * hi:+.1f}]"



def _unknown_cell(m: dict[str, Any] | None) -> str:
    """Share of samples with an unknown verdict (``n`` counts the judged ones only)."""
    if not m or m.get("unknown") is None or m.get("n") is None:
        return "n/a"
    total = m["n"] + m["unknown"]
    return f"{100 * m['unknown'] / total:.0f}%" if total else "n/a"


def render_tables(results: dict[str, Any]) -> str:
    """Markdown tables mirroring the paper: Figure 1, k sweep, capabilities, cost, attribution quality."""
    lines = [f"# pairtrace results ({results['n_pairs']} pairs, layer {results['layer']}, "
             f"headline k = {results['headline_k']})", ""]
    base = results["baseline"]
    k = results["headline_k"]
    seeded = bool(base.get("per_seed"))
    seed_head, seed_rule = (" each DPO seed |", "---|") if seeded else ("", "")
    lines += ["## Figure 1: harmful rate at the headline k (harmful request + distractors)", "",
              "Unknown = samples the judge could not call (garbled text), excluded from the rate."
              + (f" Rates pool the retrains of DPO seeds {', '.join(str(s) for s in base['seeds'])}; the last column "
                 "gives each seed's own rate." if seeded else ""), "",
              f"| method | action | harmful rate [95% CI] | reduction vs baseline | unknown |{seed_head}",
              f"|---|---|---|---|---|{seed_rule}",
              f"| baseline retrain | none | {_rate_cell(base.get('harmful'))} | | "
              f"{_unknown_cell(base.get('harmful'))} |{_seed_cell(base, 'harmful', seeded)}"]
    for row in results["interventions"]:
        if row["k"] == k or row["action"] == "source_ablation":
            red = "n/a" if row["reduction"] is None else f"{100 * row['reduction']:.0f}%"
            lines.append(f"| {row['method']} | {row['action']} | {_rate_cell(row.get('harmful'))} | {red} | "
                         f"{_unknown_cell(row.get('harmful'))} |{_seed_cell(row, 'harmful', seeded)}")
    lines += ["", "## k sweep", "", f"| method | action | k | harmful rate [95% CI] | reduction | unknown |"
              f"{' DPO seeds |' if seeded else ''}", f"|---|---|---|---|---|---|{seed_rule}"]
    for row in sorted((r for r in results["interventions"] if r["k"] is not None),
                      key=lambda r: (r["method"], r["action"], r["k"])):
        red = "n/a" if row["reduction"] is None else f"{100 * row['reduction']:.0f}%"
        seeds = f" {len(row.get('seeds') or [None])} |" if seeded else ""
        lines.append(f"| {row['method']} | {row['action']} | {row['k']} | {_rate_cell(row.get('harmful'))} | {red} | "
                     f"{_unknown_cell(row.get('harmful'))} |{seeds}")
    lines += ["", "## Capabilities", "",
              "Benign helpfulness change: the retrain minus the baseline on the same prompts, in points, with a "
              "paired 95% bootstrap interval (narrower than the two rates' own intervals suggest).", "",
              "| model | harmful, no trigger | benign helpfulness | change vs baseline (points) | format following | "
              f"XSTest over-refusal |{' helpfulness, each DPO seed |' if seeded else ''}",
              f"|---|---|---|---|---|---|{seed_rule}",
              f"| baseline | {_rate_cell(base.get('harmful_no_trigger'))} | "
              f"{_rate_cell(base.get('benign_helpfulness'))} | | {_rate_cell(base.get('format_following'))} | "
              f"{_rate_cell(base.get('over_refusal'))} |{_seed_cell(base, 'benign_helpfulness', seeded)}"]
    for row in results["interventions"]:
        change = _change_cell(row.get("benign_helpfulness_change"))
        lines.append(f"| {row['name']} | {_rate_cell(row.get('harmful_no_trigger'))} | "
                     f"{_rate_cell(row.get('benign_helpfulness'))} | {change} "
                     f"| {_rate_cell(row.get('format_following'))} | {_rate_cell(row.get('over_refusal'))} |"
                     f"{_seed_cell(row, 'benign_helpfulness', seeded)}")
    lines += ["", "## Cost of the attribution step", "",
              "| method | wall s | × probe | forward | backward | FLOPs (est.) |", "|---|---|---|---|---|---|"]
    for row in results["cost"]:
        ratio = row.get("wall_ratio")
        flops = row.get("flops_estimate")
        lines.append(f"| {row['method']} | {row['wall_s']:.2f} | {'n/a' if ratio is None else f'{ratio:.1f}×'} | "
                     f"{row['forward_passes']} | {row['backward_passes']} | "
                     f"{'n/a' if flops is None else f'{flops:.3g}'} |")
    if results.get("checks"):
        lines += ["", "## Checks against the paper's figures (headline k)", "",
                  "| check | value | threshold | ok |", "|---|---|---|---|"]
        for row in results["checks"]:
            lines.append(f"| {row['check']} | {row['value']:g} | {row['threshold']} | {'yes' if row['ok'] else 'no'} |")
    if results.get("attribution_quality"):
        lines += ["", "## Attribution quality against the organism's ground truth", "",
                  "| method | AUROC | precision at the contaminated count |", "|---|---|---|"]
        for method, q in results["attribution_quality"].items():
            auroc = "n/a" if q["auroc"] is None else f"{q['auroc']:.3f}"
            prec = "n/a" if q["precision_at_contaminated"] is None else f"{q['precision_at_contaminated']:.3f}"
            lines.append(f"| {method} | {auroc} | {prec} |")
    lines += _discovery_lines(results.get("discovery") or {})
    lines += _source_lines(results.get("sources") or {})
    lines.append("")
    return "\n".join(lines)


def _discovery_lines(discovery: dict[str, Any]) -> list[str]:
    """Markdown of each discovery view's best cluster per planted behaviour (ground truth read after clustering)."""
    from pairtrace.models import describe_response_pooling

    rows = []
    for view in [discovery, *(discovery.get("views") or [])]:
        clustering = view.get("pair_clustering") or {}
        sizes = clustering.get("sizes") or []
        pooling = describe_response_pooling(view.get("response_tokens"))
        for b in (view.get("labels") or {}).get("behaviours") or []:
            if not b.get("n_in_matrix"):
                rows.append(f"| {pooling} | {b['behaviour']} | {b['n_total']} | 0 (no direction) | | | |")
                continue
            size = sizes[b["best_cluster"] - 1] if 0 < b["best_cluster"] <= len(sizes) else "?"
            rows.append(f"| {pooling} | {b['behaviour']} | {b['n_total']} | {b['n_in_matrix']} | "
                        f"{b['best_cluster']} of {clustering.get('n_clusters', '?')} ({size} pairs) | "
                        f"{b['precision']:.0%} | {b['recall']:.0%} |")
    if not rows:
        return []
    return ["", "## Discovery against the organism's ground truth", "",
            "Each view clusters the pairs without labels; the labels are read afterwards. Best cluster: the one "
            "holding the most pairs of the behaviour; purity: its share of them; recall: the behaviour's share in it.",
            "", "| view (response means over) | planted behaviour | pairs | in the matrix | best cluster | purity | "
            "recall |", "|---|---|---|---|---|---|---|", *rows]


def _source_lines(sources: dict[str, Any]) -> list[str]:
    """Markdown of the chosen models' enrichment at the headline k (fixed top-k and scan) and across the sweep."""
    lines: list[str] = []
    chosen = [r for r in sources.get("rows") or [] if r.get("column") == "chosen_model"]
    if chosen:
        chosen.sort(key=lambda r: (r.get("scan_p_value", r["p_value"]), r["p_value"]))
        title = f"Source enrichment of the probe's top-{sources.get('k')} (chosen models, lowest scan p first)"
        lines += ["", f"## {title}",
                  "", "Scan: the most enriched top slice of size 1 to k, with its minimum-hypergeometric p-value. "
                  f"Suggested for source ablation: {', '.join(sources.get('suggested_ablation') or []) or 'none'}.",
                  "", "| chosen model | in top-k | enrichment | p | best slice | enrichment in it | scan p |",
                  "|---|---|---|---|---|---|---|"]
        for r in chosen:
            scan = (f"{r['scan_count']} of top {r['scan_k']} | {r['scan_enrichment']:.2f} | {r['scan_p_value']:.2g}"
                    if r.get("scan_k") else "n/a | n/a | n/a")
            lines.append(f"| {r['value']} | {r['count_top']} | {r['enrichment']:.2f} | {r['p_value']:.2g} | {scan} |")
    by_k = sources.get("by_k") or []
    if by_k:
        width = max(len(entry["rows"]) for entry in by_k)
        lines += ["", "## Source enrichment across the k sweep (chosen models, lowest p first)", "",
                  "| k | " + " | ".join(f"#{i + 1}" for i in range(width)) + " |", "|---|" + "---|" * width]
        for entry in by_k:
            cells = [f"{r['value']} ×{r['enrichment']:.2f}, p = {r['p_value']:.2g}" for r in entry["rows"]]
            lines.append(f"| {entry['k']} | " + " | ".join(cells + [""] * (width - len(cells))) + " |")
    return lines
