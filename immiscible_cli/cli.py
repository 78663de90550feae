"""The `immiscible` command line: the Typer app, its commands registered in the order `--help` lists them, the
`presets` commands and the console script (`main`).

The commands live by what they do: cli_train.py (`train`, `study`, `encode`), cli_sample.py (`sample`),
cli_measure.py (`eval`, `compare`, `analyze`); what they share is in cli_support.py. Each parses, checks its options,
makes its library call and says where the results went. Library modules are imported inside each command so that
`immiscible --help` and config errors answer at once, without importing torch first.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from . import cli_measure, cli_sample, cli_train
from .cli_support import examples, exit_now, out, reports_user_errors, several_processes

app = typer.Typer(
    name="immiscible",
    help="Train image diffusion and flow-matching models faster with immiscible noise assignment, "
         "watch FID fall, and compare runs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
presets_app = typer.Typer(help="List the shipped presets, or show one fully resolved.", no_args_is_help=False,
                          add_completion=False, rich_markup_mode="rich")
app.add_typer(presets_app, name="presets")


for command in (cli_train.train, cli_sample.sample, cli_measure.eval_, cli_train.encode, cli_measure.compare,
                cli_train.study, cli_measure.analyze):
    app.command(**command.typer_command)(command)


# ------------------------------------------------------------------------------------------------------------------
# presets


@presets_app.callback(invoke_without_command=True, epilog=examples(
    "every preset with its one-line description", "immiscible presets",
    "one preset with every field resolved", "immiscible presets show cifar10-knn",
))
def presets_list(ctx: typer.Context) -> None:
    """List every shipped preset with a one-line description."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.table import Table

    from .config import list_presets

    table = Table(show_header=True, header_style="bold", box=None)
    table.add_column("preset")
    table.add_column("description")
    for name, description in list_presets().items():
        table.add_row(name, description)
    out.print(table)


@presets_app.command("show", epilog=examples("a shipped preset", "immiscible presets show quickstart",
                                             "your own file", "immiscible presets show ./my-preset.yaml"))
@reports_user_errors
def presets_show(name: Annotated[str, typer.Argument(help="Preset name or path to a YAML file.")]) -> None:
    """Print a preset fully resolved (every field, defaults included) as YAML."""
    from .config import load_config

    out.print(load_config(name).to_yaml(), end="", markup=False)


def main() -> None:
    """The console script. Under torchrun (several processes) the process ends with os._exit once the command has
    left the process group and flushed its output: the interpreter's own teardown then runs no C++ destructors,
    one of which (a thread object of torch.distributed still joinable at exit) aborted rank 0 about once in eight
    finished runs ("terminate called without an active exception", SIGABRT, so torchrun reported a finished run as
    FAILED). The exit code is the command's."""
    if not several_processes():
        app()
        return
    try:
        app()
        code = 0
    except SystemExit as e:  # typer ends every command with one
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    exit_now(code)
