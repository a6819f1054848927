"""The HTML page of a screen (``screen.html``), in the style of the run report (its stylesheet is reused)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

from pairtrace import __version__
from pairtrace.records import write_text_atomic
from pairtrace.report import TEMPLATE_NAME, format_num, format_pct, format_sci

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>pairtrace screen</title>
{{ style | safe }}
</head>
<body>
<header>
  <h1>pairtrace screen</h1>
  <p>{{ n_pairs }} pairs of <code>{{ pairs }}</code> · M0 <code>{{ model }}</code> · generated {{ generated }}
     · pairtrace {{ version }}</p>
</header>
<nav>{% for b in behaviours %}<a href="#{{ b.name }}">{{ b.name }}</a>{% endfor %}</nav>
<main>
<section>
  <h2>Summary</h2>
  <table>
    <tr><th>behaviour</th><th class="num">examples</th><th>pooling</th><th class="num">layer</th>
        <th class="num">threshold</th><th class="num">pairs passing</th><th class="num">share</th></tr>
    {% for b in behaviours %}
    <tr><td><a href="#{{ b.name }}">{{ b.name }}</a></td><td class="num">{{ b.n_examples }}</td>
        <td>{{ b.pooling }}</td><td class="num">{{ b.layer }}</td><td class="num">{{ b.threshold | num(3) }}</td>
        <td class="num">{{ b.n_pass }}</td><td class="num">{{ b.share_pass | pct }}</td></tr>
    {% endfor %}
  </table>
  <p class="note">Score: cosine of a pair's datapoint vector (chosen mean − rejected mean through M0) with the
  behaviour vector built from the examples. Threshold: the {{ quantile_text }} of the examples' leave-one-out
  cosines (each example's own vector against the behaviour vector of the others).</p>
</section>
{% for b in behaviours %}
<section id="{{ b.name }}">
  <h2>{{ b.name }}</h2>
  {% if b.description %}<p>{{ b.description }}</p>{% endif %}
  <p class="note">{{ b.n_pass }} of {{ b.n_pairs }} pairs pass the threshold {{ b.threshold | num(3) }}
  ({{ b.n_examples }} examples, leave-one-out cosines {{ b.loo_text }}).</p>
  {% if b.enrichment %}
  <h3>Enrichment among the top {{ b.enrichment.k }}</h3>
  <table>
    <tr><th>column</th><th>value</th><th class="num">in top</th><th class="num">share top</th>
        <th class="num">share all</th><th class="num">enrichment</th><th class="num">p</th></tr>
    {% for r in b.enrichment.rows %}
    <tr><td>{{ r.column }}</td><td>{{ r.value }}</td><td class="num">{{ r.count_top }}</td>
        <td class="num">{{ r.share_top | pct }}</td><td class="num">{{ r.share_all | pct }}</td>
        <td class="num">{{ r.enrichment | num }}</td><td class="num">{{ r.p_value | sci }}</td></tr>
    {% endfor %}
  </table>
  {% endif %}
  <h3>Top pairs</h3>
  <table>
    <tr><th class="num">rank</th><th>id</th><th class="num">score</th><th>prompt</th><th>chosen</th>
        <th>rejected</th><th>chosen by</th></tr>
    {% for t in b.top %}
    <tr{% if t.score is not none and t.score < b.threshold %} class="note"{% endif %}>
        <td class="num">{{ t.rank }}</td><td>{{ t.id }}</td><td class="num">{{ t.score | num(3) }}</td>
        <td class="text">{{ t.prompt }}</td><td class="text">{{ t.chosen }}</td><td class="text">{{ t.rejected }}</td>
        <td>{{ t.chosen_model }}</td></tr>
    {% endfor %}
  </table>
</section>
{% endfor %}
</main>
<footer>Pairs below the threshold are shown in grey. Files: rankings/&lt;behaviour&gt;/ranking.parquet,
top/&lt;behaviour&gt;.jsonl, enrichment/&lt;behaviour&gt;.csv, screen.json.</footer>
</body>
</html>
"""


def report_style() -> str:
    """The ``<style>`` block of the run report's template, so the screen page looks like the report."""
    template = resources.files("pairtrace").joinpath(TEMPLATE_NAME).read_text(encoding="utf-8")
    match = re.search(r"<style>.*?</style>", template, flags=re.DOTALL)
    return match.group(0) if match else ""


def render_screen_html(summary: dict[str, Any]) -> str:
    """The HTML of a screen from its summary (:meth:`pairtrace.screen.ScreenResult.summary`)."""
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.ChainableUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    env.filters.update({"pct": format_pct, "num": format_num, "sci": format_sci})
    behaviours = []
    quantiles = set()
    for b in summary.get("behaviours", {}).values():
        loo = [x for x in b.get("loo_scores") or [] if x is not None]
        quantiles.add(b.get("quantile"))
        behaviours.append({**b, "loo_text": ", ".join(f"{x:.2f}" for x in sorted(loo)) or "none"})
    quantile_text = (f"{next(iter(quantiles)):.0%} quantile" if len(quantiles) == 1 else "calibration quantile")
    model = (summary.get("model") or {}).get("name", "")
    return env.from_string(_PAGE).render(
        style=report_style(), behaviours=behaviours, n_pairs=summary.get("n_pairs", 0),
        pairs=summary.get("pairs", (summary.get("dataset") or {}).get("origin", "")), model=model,
        generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), version=__version__, quantile_text=quantile_text,
    )


def write_screen_html(result: Any, path: str | Path) -> Path:
    """Write ``screen.html`` for a :class:`pairtrace.screen.ScreenResult`."""
    return write_text_atomic(render_screen_html(result.summary()), Path(path))


__all__ = ["render_screen_html", "report_style", "write_screen_html"]
