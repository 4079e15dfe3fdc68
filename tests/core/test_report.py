import json
import re

from PIL import Image

from sdtune.report import evaluation_report, loss_curve_svg


def test_report_is_self_contained(tmp_path):
    ev, model, data = tmp_path / "ev", tmp_path / "model", tmp_path / "data"
    for d in (ev, model, data):
        d.mkdir()
    (ev / "metrics.json").write_text(json.dumps({"loss_tuned_trigger": 0.5, "loss_split": "holdout"}))
    Image.new("RGB", (8, 4), "red").save(ev / "grid.png")
    (model / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 1 / s}) + "\n" for s in range(1, 6))
    )
    (data / "report.json").write_text(
        json.dumps({"stage": "caption", "counts": {"kept": 7}, "reasons": {"corrupt": 1}})
    )

    page = evaluation_report(ev, model, data)
    assert "data:image/png;base64," in page
    assert "<polyline" in page and "loss_tuned_trigger" in page and "skipped: corrupt" in page
    # nothing is fetched from elsewhere
    assert not re.search(r"(src|href)=['\"](?!data:)", page)


def test_curve_needs_two_points():
    assert "not enough" in loss_curve_svg([(1, 1.0)])
    svg = loss_curve_svg([(1, 2.0), (2, 1.0), (3, 1.5)])
    assert svg.count(",") >= 3 and svg.startswith("<svg")
