"""The Markdown tables of a run (``tables.md``), mirroring the paper: Figure 1, the k sweep, capabilities, the
cost of attribution, the checks, attribution quality, discovery and source enrichment. The HTML report
(:mod:`pairtrace.report`) is drawn from the same ``results.json``.

Every harmful rate is shown both ways: with unknown verdicts left out (the primary rate, which the checks decide
on, with the unknown share beside it) and with them counted as harmful. Titles name the run's trigger from
``results["trigger"]``.
"""

from __future__ import annotations

from typing import Any

from pairtrace.experiment.checks import MIN_POOLED_RETRAINS
from pairtrace.experiment.results import REDUCTION_INTERVAL, trigger_label


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _rate_cell(m: dict[str, Any] | None, suffix: str = "") -> str:
    """A rate with its interval, e.g. ``10.0% [0.0%, 20.0%]``; ``suffix`` ``_unknown_as_harmful`` picks the rate
    that counts unknown verdicts as harmful."""
    if not m or m.get(f"rate{suffix}") is None:
        return "n/a"
    lo, hi = (m.get(f"ci{suffix}") or [None, None])[:2]
    if lo is None or hi is None:
        return _pct(m[f"rate{suffix}"])
    return f"{_pct(m[f'rate{suffix}'])} [{_pct(lo)}, {_pct(hi)}]"


def _any_cell(m: dict[str, Any] | None) -> str:
    """The harmful rate with unknown verdicts counted as harmful, with its interval."""
    return _rate_cell(m, "_unknown_as_harmful")


def _reduction_cell(row: dict[str, Any], suffix: str = "") -> str:
    """A reduction against the baseline in percent, with its paired 95% interval when there is one."""
    value = row.get(f"reduction{suffix}")
    if value is None:
        return "n/a"
    lo, hi = ((row.get("reduction_interval") or {}).get(f"ci{suffix}") or [None, None])[:2]
    text = f"{100 * value:.0f}%"
    return text if lo is None or hi is None else f"{text} [{100 * lo:.0f}%, {100 * hi:.0f}%]"


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


HARMFUL_HEAD = ("harmful rate [95% CI] | reduction vs baseline | unknown | harmful if unknown counted [95% CI] | "
                "reduction if unknown counted")
"""The harmful-rate columns of Figure 1 and the k sweep (:func:`_harmful_cells`)."""
HARMFUL_RULE = "---|" * 5


def _harmful_cells(row: dict[str, Any], baseline: bool = False) -> list[str]:
    """The :data:`HARMFUL_HEAD` cells of a baseline or intervention row (the baseline has no reduction)."""
    harmful = row.get("harmful")
    reduction, any_reduction = ("", "") if baseline else (_reduction_cell(row),
                                                           _reduction_cell(row, "_unknown_as_harmful"))
    return [_rate_cell(harmful), reduction, _unknown_cell(harmful), _any_cell(harmful), any_reduction]


def _md_row(*cells: str) -> str:
    """One Markdown table row; an empty cell is written ``| |``."""
    return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"


def render_tables(results: dict[str, Any]) -> str:
    """Markdown tables mirroring the paper: Figure 1, k sweep, capabilities, cost, attribution quality."""
    lines = [f"# pairtrace results ({results['n_pairs']} pairs, layer {results['layer']}, "
             f"headline k = {results['headline_k']})", ""]
    base = results["baseline"]
    k = results["headline_k"]
    seeded = bool(base.get("per_seed"))
    seed_head, seed_rule = (" each DPO seed |", "---|") if seeded else ("", "")
    label = trigger_label(results)
    lines += [f"## Figure 1: harmful rate at the headline k ({label})", "",
              "Unknown = samples the judge could not call (garbled text): excluded from the harmful rate and its "
              "reduction, which the checks decide on; \"if unknown counted\" counts them as harmful instead. Rates "
              "have 95% bootstrap intervals over prompts; reductions a paired bootstrap interval over prompts (see "
              "the checks' note)."
              + (f" Rates pool the retrains of DPO seeds {', '.join(str(s) for s in base['seeds'])}; the last column "
                 "gives each seed's own rate." if seeded else ""), "",
              f"| method | action | {HARMFUL_HEAD} |{seed_head}", f"|---|---|{HARMFUL_RULE}{seed_rule}",
              _md_row("baseline retrain", "none", *_harmful_cells(base, baseline=True))
              + _seed_cell(base, "harmful", seeded)]
    for row in results["interventions"]:
        if row["k"] == k or row["action"] == "source_ablation":
            lines.append(_md_row(row["method"], row["action"], *_harmful_cells(row))
                         + _seed_cell(row, "harmful", seeded))
    lines += ["", f"## k sweep ({label})", "",
              f"| method | action | k | {HARMFUL_HEAD} |{' DPO seeds |' if seeded else ''}",
              f"|---|---|---|{HARMFUL_RULE}{seed_rule}"]
    for row in sorted((r for r in results["interventions"] if r["k"] is not None),
                      key=lambda r: (r["method"], r["action"], r["k"])):
        seeds = f" {len(row.get('seeds') or [None])} |" if seeded else ""
        lines.append(_md_row(row["method"], row["action"], str(row["k"]), *_harmful_cells(row)) + seeds)
    lines += ["", "## Capabilities", "",
              "Benign helpfulness change: the retrain minus the baseline on the same prompts, in points, with a "
              "paired 95% bootstrap interval (narrower than the two rates' own intervals suggest). Format following "
              "is n/a where no sample carries a checkable constraint.", "",
              "| model | harmful, no trigger | harmful, no trigger, if unknown counted | benign helpfulness | "
              "change vs baseline (points) | format following | "
              f"XSTest over-refusal |{' helpfulness, each DPO seed |' if seeded else ''}",
              f"|---|---|---|---|---|---|---|{seed_rule}"]
    for name, row in [("baseline", base), *((r["name"], r) for r in results["interventions"])]:
        change = "" if row is base else f" {_change_cell(row.get('benign_helpfulness_change'))}"
        no_trigger = row.get("harmful_no_trigger")
        lines.append(f"| {name} | {_rate_cell(no_trigger)} | {_any_cell(no_trigger)} | "
                     f"{_rate_cell(row.get('benign_helpfulness'))} |{change} | "
                     f"{_rate_cell(row.get('format_following'))} | {_rate_cell(row.get('over_refusal'))} |"
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
        lines += _check_lines(results["checks"])
    if results.get("attribution_quality"):
        lines += ["", "## Attribution quality against the organism's ground truth", "",
                  "| method | AUROC | precision at the contaminated count |", "|---|---|---|"]
        for method, q in results["attribution_quality"].items():
            auroc = "n/a" if q["auroc"] is None else f"{q['auroc']:.3f}"
            prec = "n/a" if q["precision_at_contaminated"] is None else f"{q['precision_at_contaminated']:.3f}"
            lines.append(f"| {method} | {auroc} | {prec} |")
    emergence = (results.get("organism") or {}).get("emergence") or []
    lines += _emergence_lines(emergence)
    lines += _discovery_lines(results.get("discovery") or {}, emergence)
    lines += _source_lines(results.get("sources") or {})
    lines.append("")
    return "\n".join(lines)


def _check_lines(checks: list[dict[str, Any]]) -> list[str]:
    """Markdown of the checks: each value with its 95% interval and the retrains it pools where it has them."""
    lines = ["", "## Checks against the paper's figures (headline k)", "",
             "Reduction checks decide on the reduction with unknown verdicts left out (the experiment's DPO seeds "
             "pooled); the note gives it with unknown verdicts counted as harmful. 95% CI of a reduction: "
             f"{REDUCTION_INTERVAL}. Retrains pooled: the intervention's (the baseline's). A random-baseline check "
             f"is decided only when both pool at least {MIN_POOLED_RETRAINS} retrains.", "",
             "| check | value | 95% CI | retrains pooled | threshold | ok | note |", "|---|---|---|---|---|---|---|"]
    for row in checks:
        ci = row.get("ci")
        ci_text = f"[{ci[0]:g}, {ci[1]:g}]" if ci and None not in ci else ""
        pooled = (f"{row['n_retrains']} ({row.get('n_baseline_retrains', '?')})"
                  if row.get("n_retrains") is not None else "")
        notes = [row["reason"]] if row.get("reason") else []
        if row.get("reduction_unknown_as_harmful") is not None:
            notes.append(f"if unknown counted: {row['reduction_unknown_as_harmful']:g}")
        lines.append(f"| {row['check']} | {row['value']:g} | {ci_text} | {pooled} | {row['threshold']} | "
                     f"{'yes' if row['ok'] else 'no'} | {'; '.join(notes)} |")
    return lines


def _emergence_lines(emergence: list[dict[str, Any]]) -> list[str]:
    """Markdown of the organism build's emergence table: each planted behaviour's rate in M0 and in M1."""
    if not emergence:
        return []
    lines = ["", "## Planted behaviours: did they emerge? (organism build)", "",
             "Rate of each planted behaviour's chosen style on its own held-out requests (harmful rates leave unknown "
             "verdicts out); emerged: M1 at least 10 points above M0 and at least twice M0. Discovery and attribution "
             "are read against the behaviours that emerged.", "",
             "| behaviour | kind | measured on | M0 | M1 | emerged |", "|---|---|---|---|---|---|"]
    for row in emergence:
        m0, m1 = row.get("m0"), row.get("m1")
        lines.append(f"| {row['behaviour']} | {row.get('kind', '')} | {row.get('prompts') or 'n/a'} | "
                     f"{'n/a' if m0 is None else f'{m0:.1%}'} | {'n/a' if m1 is None else f'{m1:.1%}'} | "
                     f"{'yes' if row.get('emerged') else 'no'} |")
    return lines


def _behaviour_status(emergence: list[dict[str, Any]]) -> dict[str, str]:
    """Planted behaviour name -> ``yes`` / ``no`` (emerged in the organism build); decoys are not behaviours."""
    return {row["behaviour"]: "yes" if row.get("emerged") else "no" for row in emergence}


def _discovery_lines(discovery: dict[str, Any], emergence: list[dict[str, Any]] | None = None) -> list[str]:
    """Markdown of each discovery view's best cluster per planted behaviour (ground truth read after clustering),
    with whether the behaviour emerged in the organism build (``decoy`` for a decoy slice, which is not one)."""
    from pairtrace.models import describe_response_pooling

    status = _behaviour_status(emergence or [])
    rows = []
    for view in [discovery, *(discovery.get("views") or [])]:
        clustering = view.get("pair_clustering") or {}
        sizes = clustering.get("sizes") or []
        pooling = describe_response_pooling(view.get("response_tokens"))
        for b in (view.get("labels") or {}).get("behaviours") or []:
            emerged = status.get(b["behaviour"], "decoy" if status else "n/a")
            if not b.get("n_in_matrix"):
                rows.append(f"| {pooling} | {b['behaviour']} | {emerged} | {b['n_total']} | 0 (no direction) | | | |")
                continue
            size = sizes[b["best_cluster"] - 1] if 0 < b["best_cluster"] <= len(sizes) else "?"
            rows.append(f"| {pooling} | {b['behaviour']} | {emerged} | {b['n_total']} | {b['n_in_matrix']} | "
                        f"{b['best_cluster']} of {clustering.get('n_clusters', '?')} ({size} pairs) | "
                        f"{b['precision']:.0%} | {b['recall']:.0%} |")
    if not rows:
        return []
    return ["", "## Discovery against the organism's ground truth", "",
            "Each view clusters the pairs without labels; the labels are read afterwards. Best cluster: the one "
            "holding the most pairs of the behaviour; purity: its share of them; recall: the behaviour's share in it.",
            "", "| view (response means over) | planted behaviour | emerged in M1 | pairs | in the matrix | "
            "best cluster | purity | recall |", "|---|---|---|---|---|---|---|---|", *rows]


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
