"""Data commands: ingest, preprocess, caption, sample-data."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    pass
