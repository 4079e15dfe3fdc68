"""The evaluation report: one self-contained HTML page (no external assets) with the sample grid (base row
vs tuned row), the metric table, the training curve and the data report summary. Logged to MLflow and
emitted as a KFP ``HTML`` artifact, so it renders in both UIs."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}"
    "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}img{max-width:100%}"
    "svg{background:#fafafa;border:1px solid #ddd}"
)


def loss_curve_svg(points: list[tuple[int, float]], width: int = 640, height: int = 220) -> str:
    """An inline SVG line chart of (step, loss): no plotting library, no external file."""
    if len(points) < 2:
        return "<p>(not enough logged steps for a curve)</p>"
    steps, losses = zip(*points, strict=True)
    x0, x1, y0, y1 = min(steps), max(steps), min(losses), max(losses)
    pad, span_x, span_y = 40, max(x1 - x0, 1), max(y1 - y0, 1e-12)

    def xy(step: int, loss: float) -> str:
        x = pad + (step - x0) / span_x * (width - 2 * pad)
        y = height - pad - (loss - y0) / span_y * (height - 2 * pad)
        return f"{x:.1f},{y:.1f}"

    line = " ".join(xy(s, v) for s, v in points)
    return (
        f"<svg role='img' aria-label='training loss' width='{width}' height='{height}' "
        f"xmlns='http://www.w3.org/2000/svg'><polyline fill='none' stroke='#c0392b' stroke-width='2' "
        f"points='{line}'/><text x='{pad}' y='{pad - 10}' font-size='12'>loss {y1:.4g}</text>"
        f"<text x='{pad}' y='{height - 8}' font-size='12'>step {x0} … {x1}; min loss {y0:.4g}</text></svg>"
    )


def _loss_points(model_dir: Path) -> list[tuple[int, float]]:
    path = model_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    points = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if "loss" in row and "step" in row:
            points.append((int(row["step"]), float(row["loss"])))
    return points


def _table(rows: dict[str, Any]) -> str:
    cells = []
    for key, value in rows.items():
        shown = f"{value:.5g}" if isinstance(value, float) else html.escape(str(value))
        cells.append(f"<tr><th>{html.escape(str(key))}</th><td>{shown}</td></tr>")
    return f"<table>{''.join(cells)}</table>"


def evaluation_report(
    evaluation_dir: Path, model_dir: Path | None = None, data_dir: Path | None = None
) -> str:
    evaluation_dir = Path(evaluation_dir)
    metrics = json.loads((evaluation_dir / "metrics.json").read_text())
    numeric = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>sdtune evaluation</title><style>{STYLE}</style>"
        "</head><body><h1>Evaluation</h1>"
    ]
    grid = evaluation_dir / "grid.png"
    if grid.is_file():
        data = base64.b64encode(grid.read_bytes()).decode("ascii")
        parts.append(
            "<h2>Samples</h2><p>Top row: base model. Bottom row: fine-tuned. Same seed per column.</p>"
        )
        parts.append(f"<img alt='sample grid' src='data:image/png;base64,{data}'>")
    parts.append("<h2>Metrics</h2>" + _table(numeric))
    for key in ("loss_split", "fidelity_note"):
        if isinstance(metrics.get(key), str):
            parts.append(f"<p><b>{key}</b>: {html.escape(metrics[key])}</p>")
    if model_dir is not None:
        parts.append("<h2>Training loss</h2>" + loss_curve_svg(_loss_points(Path(model_dir))))
    if data_dir is not None and (Path(data_dir) / "report.json").is_file():
        report = json.loads((Path(data_dir) / "report.json").read_text())
        summary = {f"images {k}": v for k, v in report.get("counts", {}).items()}
        summary.update({f"skipped: {k}": v for k, v in report.get("reasons", {}).items()})
        parts.append(f"<h2>Data ({html.escape(report.get('stage', ''))} stage)</h2>" + _table(summary))
    parts.append("</body></html>")
    return "".join(parts)
