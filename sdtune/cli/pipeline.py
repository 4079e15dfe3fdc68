"""Pipeline commands: run, compile, submit, schedule, runs."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    pass
