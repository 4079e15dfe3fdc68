"""`sdtune runs list|compare`: what was tracked, as a table in the terminal or a page with the grids."""

from __future__ import annotations

import json
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from sdtune.cli.printing import plain_console
from sdtune.errors import ServiceError, UsageError

console = plain_console()
DEFAULT_GATE = "loss_tuned_trigger"


def _row_json(row) -> dict:
    return {
        "run_id": row.run_id,
        "name": row.name,
        "status": row.status,
        "start_ms": row.start_ms,
        "champion": row.champion,
        "params": row.params,
        "metrics": row.metrics,
        "tags": {k: v for k, v in row.tags.items() if not k.startswith("mlflow.")},
    }


def register(app: typer.Typer) -> None:
    runs = typer.Typer(help="List and compare tracked runs (MLflow).", no_args_is_help=True)
    app.add_typer(runs, name="runs")

    @runs.command("list")
    def list_command(
        experiment: Annotated[str, typer.Option(help="MLflow experiment")] = "sdtune",
        metric: Annotated[
            list[str] | None, typer.Option(help="Metric columns (default: each run's gate metric)")
        ] = None,
        limit: Annotated[int, typer.Option(help="Newest N runs")] = 20,
        sweep: Annotated[str | None, typer.Option(help="Only the trials of this sweep id")] = None,
        wide: Annotated[
            bool, typer.Option("--wide", help="Every key param and up to 8 metrics (needs a wide terminal)")
        ] = False,
        as_json: Annotated[
            bool, typer.Option("--json", help="Every param, metric and tag of each run, as JSON")
        ] = False,
    ) -> None:
        """The pipeline runs of an experiment, newest first; ★ marks the registered champion.

        Example: sdtune runs list --limit 5 --metric loss_tuned_trigger"""
        from sdtune.compare import KEY_PARAMS, list_runs

        rows = list_runs(experiment, limit, sweep_id=sweep)
        if as_json:
            typer.echo(json.dumps([_row_json(r) for r in rows], indent=2))
            return
        if not rows:
            console.print(f"no runs in experiment {experiment!r}")
            return
        if wide:
            metrics = metric or sorted({k for r in rows for k in r.metrics})[:8]
            params = [p for p in KEY_PARAMS if any(p in r.params for r in rows) and p != "model.base"]
        else:  # fits 100 columns: the method and the metric the registry gate decides on
            metrics = metric or sorted({r.params.get("register.gate_metric", DEFAULT_GATE) for r in rows})[:2]
            params = ["train.method"]
        table = Table(title=f"runs in {experiment}", box=box.SIMPLE_HEAD, pad_edge=False)
        table.add_column("", width=1)
        table.add_column("run", no_wrap=True)
        table.add_column("name", overflow="ellipsis", max_width=22, no_wrap=True)
        table.add_column("status", no_wrap=True)
        table.add_column("started (UTC)", no_wrap=True)
        for col in params:
            table.add_column(col.split(".")[-1], no_wrap=True)
        for col in metrics:
            table.add_column(col, justify="right", no_wrap=True)
        for r in rows:
            started = datetime.fromtimestamp(r.start_ms / 1000, tz=timezone.utc).strftime("%m-%d %H:%M")
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
        if not wide:
            console.print("more columns: --wide, --metric NAME, or --json", style="dim")

    @runs.command("compare")
    def compare_command(
        run_ids: Annotated[
            list[str] | None,
            typer.Argument(
                help="Parent run ids, or unique prefixes such as the 8 characters `runs list` shows"
            ),
        ] = None,
        html: Annotated[
            Path | None, typer.Option(help="Also write a side-by-side page with the sample grids")
        ] = None,
        sweep: Annotated[
            str | None, typer.Option(help="Compare the trials of this sweep, ranked by its metric")
        ] = None,
        experiment: Annotated[str, typer.Option(help="MLflow experiment (with --sweep)")] = "sdtune",
    ) -> None:
        """Side by side: the params that differ and every metric (or a sweep's trials, ranked).

        Example: sdtune runs compare 632e4406 9a0b5c5d --html compare.html"""
        from mlflow.exceptions import MlflowException

        from sdtune.compare import compare_html, differing_params, get_rows

        if sweep:
            from sdtune.cli.sweep import show_sweep

            show_sweep(sweep, experiment, html=html)
            return
        if not run_ids:
            raise UsageError("name the run ids to compare, or --sweep ID")
        try:
            rows = get_rows(run_ids)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise UsageError(f"no such run: {str(exc).splitlines()[0]}") from None
            raise ServiceError(f"cannot read runs: {str(exc).splitlines()[0]}") from None
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
