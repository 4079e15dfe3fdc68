"""`sdtune` command line: every stage, the tiny models, and running/compiling/submitting the pipeline.

Each group of commands lives in its own module and registers itself on :data:`app`; bad input ends with one
``error: …`` line and the error's exit code (the table in ``docs/distributed.md``), never a traceback.
"""

from __future__ import annotations

import contextlib
import sys

import click
import typer
from rich.text import Text

from sdtune.cli.printing import plain_console
from sdtune.errors import SdtuneError

app = typer.Typer(
    name="sdtune",
    help="Stable Diffusion fine-tuning as a Kubeflow pipeline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = plain_console(stderr=True)


def _version(value: bool) -> None:
    if value:
        from sdtune import __version__

        typer.echo(f"sdtune {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Stable Diffusion fine-tuning as a Kubeflow pipeline.

    Start with `make run`, or: sdtune run --local configs/debug/tiny_cpu.yaml"""


def _hide_flag_types() -> None:
    """typer's help shows a ``<bool>`` type beside every on/off flag (``--local <bool>``), which reads as if
    the flag took a value: show nothing there, as click does."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich
    if getattr(shown, "_sdtune", False):
        return

    def display_type_rich(self, ctx):
        return None if self.is_flag else shown(self, ctx)

    display_type_rich._sdtune = True
    TyperOption.display_type_rich = display_type_rich


_registered = False


def _register_commands() -> None:
    global _registered
    if _registered:  # main() may run many times in one process (tests)
        return
    from sdtune.cli import cluster, data, pipeline, runs, sweep, train

    for module in (data, train, pipeline, runs, cluster, sweep):
        module.register(app)
    _hide_flag_types()
    _registered = True


def _click_exceptions(name: str) -> tuple[type[BaseException], ...]:
    """The class from click and from the copy of click that recent typer releases vendor."""
    modules = [click.exceptions]
    with contextlib.suppress(ImportError):
        from typer._click import exceptions as vendored

        modules.append(vendored)
    return tuple(getattr(m, name) for m in modules if hasattr(m, name))


def main(argv: list[str] | None = None) -> int:
    _register_commands()
    try:
        result = app(args=argv, standalone_mode=False)
    except _click_exceptions("Exit") as exc:
        return exc.exit_code
    except _click_exceptions("Abort"):
        err_console.print("aborted")
        return 130
    except _click_exceptions("ClickException") as exc:  # usage errors: click's own one-line message
        exc.show()
        return exc.exit_code
    except SdtuneError as exc:
        err_console.print(Text.assemble(("error:", "bold red"), f" {exc}"), highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
