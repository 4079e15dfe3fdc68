"""`sdtune runs list|compare`: what was tracked, as a table in the terminal or a page with the grids."""

from __future__ import annotations

import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from sdtune.errors import SdtuneError

console = Console()


def register(app: typer.Typer) -> None:
    runs = typer.Typer(help="List and compare tracked runs (MLflow).", no_args_is_help=True)
    app.add_typer(runs, name="runs")

    @runs.command("list")
    def list_command(
        experiment: Annotated[str, typer.Option(help="MLflow experiment")] = "sdtune",
        metric: Annotated[
            list[str] | None, typer.Option(help="Metric columns (default: every metric)")
        ] = None,
        limit: Annotated[int, typer.Option(help="Newest N runs")] = 20,
        sweep: Annotated[str | None, typer.Option(help="Only the trials of this sweep id")] = None,
    ) -> None:
        """The pipeline runs of an experiment, newest first; ★ marks the registered champion."""
        from sdtune.compare import KEY_PARAMS, list_runs

        rows = list_runs(experiment, limit, sweep_id=sweep)
        if not rows:
            console.print(f"no runs in experiment {experiment!r}")
            return
        metrics = metric or sorted({k for r in rows for k in r.metrics})[:6]
        params = [p for p in KEY_PARAMS if any(p in r.params for r in rows) and p != "model.base"]
        table = Table(title=f"runs in {experiment}")
        for col in ("", "run", "name", "status", "started", *params, *metrics):
            table.add_column(col)
        for r in rows:
            started = datetime.fromtimestamp(r.start_ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M")
            table.add_row(
                "★" if r.champion else "",
                r.run_id[:8],
                r.name,
                r.status,
                started,
                *(r.params.get(p, "") for p in params),
                *(f"{r.metrics[m]:.4g}" if m in r.metrics else "" for m in metrics),
            )
        console.print(table)

    @runs.command("compare")
    def compare_command(
        run_ids: Annotated[
            list[str] | None, typer.Argument(help="Parent run ids (from `sdtune runs list`)")
        ] = None,
        html: Annotated[
            Path | None, typer.Option(help="Also write a side-by-side page with the sample grids")
        ] = None,
        sweep: Annotated[
            str | None, typer.Option(help="Compare the trials of this sweep, ranked by its metric")
        ] = None,
        experiment: Annotated[str, typer.Option(help="MLflow experiment (with --sweep)")] = "sdtune",
    ) -> None:
        """Side by side: the params that differ and every metric (or a sweep's trials, ranked)."""
        from mlflow.exceptions import MlflowException

        from sdtune.compare import compare_html, differing_params, get_rows

        if sweep:
            from sdtune.cli.sweep import show_sweep

            show_sweep(sweep, experiment, html=html)
            return
        if not run_ids:
            raise SdtuneError("name the run ids to compare, or --sweep ID")
        try:
            rows = get_rows(run_ids)
        except MlflowException as exc:
            raise SdtuneError(f"cannot read runs: {str(exc).splitlines()[0]}") from None
        table = Table(title="run comparison")
        table.add_column("")
        for r in rows:
            table.add_column(f"{r.name} {r.run_id[:8]}{' ★' if r.champion else ''}")
        for key in differing_params(rows):
            table.add_row(key, *(r.params.get(key, "") for r in rows))
        for key in sorted({k for r in rows for k in r.metrics}):
            table.add_row(key, *(f"{r.metrics[key]:.5g}" if key in r.metrics else "" for r in rows))
        console.print(table)
        if html:
            with tempfile.TemporaryDirectory() as tmp:
                console.print(f"wrote {compare_html(rows, html, Path(tmp))}")
