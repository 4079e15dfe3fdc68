"""The sweep comparison page: one self-contained HTML file (no scripts, no external assets).

* a header with the metric, the direction and the best trial;
* the metric table, best first: each trial's varied values, the sweep metric, the other evaluation
  metrics, its status and failure reason;
* one parameter-vs-metric plot per varied key (inline SVG; log x axis for positive values spanning ≥10×,
  one column per value for non-numeric keys);
* every trial's sample grid side by side (PNG as data: URIs), best first.
"""

from __future__ import annotations

import base64
import html
import json
import math
from typing import Any

from sdtune.sweep.select import TrialResult, rank_trials

W, H, PAD_L, PAD_R, PAD_T, PAD_B = 420, 260, 64, 16, 16, 52


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.5g}"
    return value if isinstance(value, str) else json.dumps(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi == lo:
        return [lo]
    return [lo + (hi - lo) * i / n for i in range(n + 1)]


def plot_svg(key: str, points: list[tuple[Any, float, str, bool]], metric: str) -> str:
    """Scatter of ``(param value, metric value, trial name, is best)``; returns an inline ``<svg>``."""
    if not points:
        return ""
    ys = [p[1] for p in points]
    y_lo, y_hi = min(ys), max(ys)
    if y_hi == y_lo:
        y_lo, y_hi = y_lo - 0.5 * (abs(y_lo) or 1), y_hi + 0.5 * (abs(y_hi) or 1)
    numeric = all(_is_number(p[0]) for p in points)
    log = (
        numeric
        and min(p[0] for p in points) > 0
        and max(p[0] for p in points) >= 10 * min(p[0] for p in points)
    )
    if numeric:
        xs_raw = [float(p[0]) for p in points]
        conv = (lambda v: math.log10(v)) if log else (lambda v: v)
        x_lo, x_hi = conv(min(xs_raw)), conv(max(xs_raw))
        if x_hi == x_lo:
            x_lo, x_hi = x_lo - 1, x_hi + 1
        span = x_hi - x_lo
        x_lo, x_hi = x_lo - 0.08 * span, x_hi + 0.08 * span

        def x_of(v: Any) -> float:
            return PAD_L + (conv(float(v)) - x_lo) / (x_hi - x_lo) * (W - PAD_L - PAD_R)

        x_ticks = [(x_of(10**t if log else t), f"{10**t if log else t:.3g}") for t in _ticks(x_lo, x_hi)]
    else:
        cats: list[str] = []
        for p in points:
            if _fmt(p[0]) not in cats:
                cats.append(_fmt(p[0]))

        def x_of(v: Any) -> float:
            return PAD_L + (cats.index(_fmt(v)) + 0.5) / len(cats) * (W - PAD_L - PAD_R)

        x_ticks = [(x_of(c), c if len(c) <= 18 else c[:17] + "…") for c in cats]

    def y_of(v: float) -> float:
        return PAD_T + (y_hi - v) / (y_hi - y_lo) * (H - PAD_T - PAD_B)

    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{W}' height='{H}' viewBox='0 0 {W} {H}' role='img' "
        f"aria-label='{html.escape(metric)} vs {html.escape(key)}'>",
        f"<rect x='{PAD_L}' y='{PAD_T}' width='{W - PAD_L - PAD_R}' height='{H - PAD_T - PAD_B}' "
        "fill='#fafafa' stroke='#999'/>",
    ]
    for ty in _ticks(y_lo, y_hi):
        y = y_of(ty)
        parts.append(f"<line x1='{PAD_L - 4}' x2='{PAD_L}' y1='{y:.1f}' y2='{y:.1f}' stroke='#666'/>")
        parts.append(
            f"<text x='{PAD_L - 6}' y='{y + 4:.1f}' font-size='10' text-anchor='end'>{ty:.4g}</text>"
        )
    for x, label in x_ticks:
        parts.append(f"<line x1='{x:.1f}' x2='{x:.1f}' y1='{H - PAD_B}' y2='{H - PAD_B + 4}' stroke='#666'/>")
        parts.append(
            f"<text x='{x:.1f}' y='{H - PAD_B + 16}' font-size='10' text-anchor='middle'>{html.escape(label)}</text>"
        )
    axis = f"{key} (log)" if log else key
    parts.append(
        f"<text x='{(W + PAD_L) / 2:.0f}' y='{H - 8}' font-size='11' text-anchor='middle'>{html.escape(axis)}</text>"
    )
    parts.append(
        f"<text x='12' y='{(H - PAD_B + PAD_T) / 2:.0f}' font-size='11' text-anchor='middle' "
        f"transform='rotate(-90 12 {(H - PAD_B + PAD_T) / 2:.0f})'>{html.escape(metric)}</text>"
    )
    for value, metric_value, name, best in points:
        x, y = x_of(value), y_of(metric_value)
        color, radius = ("#d62728", 6) if best else ("#1f77b4", 4)
        parts.append(
            f"<circle cx='{x:.1f}' cy='{y:.1f}' r='{radius}' fill='{color}'><title>{html.escape(name)}: "
            f"{html.escape(key)}={html.escape(_fmt(value))}, {html.escape(metric)}={metric_value:.5g}</title></circle>"
        )
    parts.append("</svg>")
    return "".join(parts)


def comparison_html(
    sweep_id: str,
    metric: str,
    direction: str,
    results: list[TrialResult],
    grids: dict[str, bytes],
    best: TrialResult | None = None,
) -> str:
    """The page; ``grids`` maps a trial name to its sample-grid PNG bytes."""
    ranked = rank_trials(results, metric, direction)
    keys: list[str] = []
    for r in results:
        keys += [k for k in r.overrides if k not in keys]
    others = sorted(
        {k for r in results for k in r.metrics if k != metric and not k.startswith("loss_records")}
    )
    esc = html.escape

    head = ["#", "trial", *keys, f"<b>{esc(metric)}</b>", *others, "status", "seconds", "error"]
    rows = []
    for rank, r in enumerate(ranked, 1):
        cls = " class='best'" if best is not None and r.name == best.name else ""
        cells = [str(rank) if r.ok else "–", esc(r.name)]
        cells += [esc(_fmt(r.overrides[k])) if k in r.overrides else "" for k in keys]
        cells.append(f"<b>{r.metrics[metric]:.5g}</b>" if metric in r.metrics else "")
        cells += [f"{r.metrics[k]:.5g}" if k in r.metrics else "" for k in others]
        cells += [esc(r.status), f"{r.seconds:.0f}" if r.seconds else "", esc(r.error[:300])]
        rows.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    table = (
        "<table class='metrics'><tr>"
        + "".join(f"<th>{h if h.startswith('<b>') else esc(h)}</th>" for h in head)
        + "</tr>"
        + "".join(rows)
        + "</table>"
    )

    plots = []
    for key in keys:
        points = [
            (r.overrides[key], r.metrics[metric], r.name, best is not None and r.name == best.name)
            for r in results
            if r.ok and key in r.overrides and metric in r.metrics and math.isfinite(r.metrics[metric])
        ]
        if points:
            plots.append(
                f"<figure>{plot_svg(key, points, metric)}<figcaption>{esc(metric)} vs {esc(key)}"
                "</figcaption></figure>"
            )

    cards = []
    for r in ranked:
        png = grids.get(r.name)
        caption = f"{esc(r.name)}: {esc(r.status)}"
        if metric in r.metrics:
            caption += f" · {esc(metric)} {r.metrics[metric]:.5g}"
        desc = esc(" ".join(f"{k}={_fmt(v)}" for k, v in r.overrides.items()))
        if png:
            data = base64.b64encode(png).decode("ascii")
            body = f"<img alt='sample grid of {esc(r.name)}' src='data:image/png;base64,{data}'>"
        else:
            body = f"<div class='nogrid'>no sample grid{(': ' + esc(r.error[:200])) if r.error else ''}</div>"
        star = " ★ best" if best is not None and r.name == best.name else ""
        cards.append(
            f"<div class='card'><div class='cap'><b>{caption}{star}</b><br><small>{desc}</small></div>"
            f"{body}</div>"
        )

    best_line = (
        f"best: <b>{esc(best.name)}</b> ({esc(metric)} {best.metrics.get(metric, float('nan')):.5g}) — "
        f"{esc(' '.join(f'{k}={_fmt(v)}' for k, v in best.overrides.items()))}"
        if best is not None
        else "no best trial"
    )
    failed = sum(not r.ok for r in results)
    style = (
        "body{font-family:sans-serif;margin:16px}table{border-collapse:collapse;margin:8px 0}"
        "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px;text-align:left;vertical-align:top}"
        "tr.best td{background:#fff3cd}figure{display:inline-block;margin:8px}"
        ".grids{display:flex;gap:12px;overflow-x:auto;align-items:flex-start}"
        ".card{border:1px solid #ccc;padding:6px;flex:0 0 auto}.card img{display:block;max-width:360px}"
        ".nogrid{width:200px;height:120px;background:#eee;font-size:12px;padding:6px}"
    )
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>sdtune sweep {esc(sweep_id)}</title><style>{style}</style></head><body>"
        f"<h1>Sweep {esc(sweep_id)}</h1>"
        f"<p>{len(results)} trials ({failed} failed) · metric <b>{esc(metric)}</b> ({esc(direction)}) · {best_line}</p>"
        f"<h2>Trials</h2>{table}"
        f"<h2>Parameters vs {esc(metric)}</h2>{''.join(plots) or '<p>no finished trials to plot</p>'}"
        f"<h2>Sample grids</h2><div class='grids'>{''.join(cards)}</div>"
        "</body></html>"
    )
