"""The consoles the CLI prints with: what is printed appears as it was given.

Paths, run ids, config names and error messages are user text. Rich would read ``[…]`` in them as markup
(``photos[/]`` ends in a MarkupError, ``[red]x`` prints ``x``) and ``:smile:`` as an emoji, so markup and
emoji are off on every console here; styled parts are :class:`rich.text.Text` instead.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.text import Text


def plain_console(**kwargs: Any) -> Console:
    """A console that reads no markup or emoji codes in what it prints (tables and rules included)."""
    return Console(markup=False, emoji=False, **kwargs)


def labelled(label: str, value: object, width: int = 0) -> Text:
    """A bold label padded to ``width``, a space and the value: one summary line."""
    return Text.assemble((f"{label:<{width}}", "bold"), " ", str(value))
