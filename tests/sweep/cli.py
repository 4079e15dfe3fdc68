"""`python -m tests.sweep.cli …`: the sdtune CLI with the sweep commands registered (until the lead adds
``sweep`` to ``sdtune/cli/__init__.py``'s module list; harmless afterwards)."""

from __future__ import annotations

import sys

from sdtune.cli import app, main
from sdtune.cli import sweep as sweep_cli


def run(argv: list[str]) -> int:
    if not any(c.name == "sweep" for c in app.registered_commands):
        sweep_cli.register(app)
    return main(argv)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
