"""What every command (cli.py and the cli_*.py modules) shares: the two consoles, `fail` (one line, an exit code,
no traceback), the decorators that turn library errors into those lines and join torchrun's process group, the
`command` mark with the help's Examples block, and the option types several commands take.

Nothing here imports torch: `immiscible --help` and bad input answer at once.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape

from .config.methods import SAMPLERS
from .errors import EXIT_ENVIRONMENT, UserError, describe_os_error, is_out_of_memory

SAMPLER_HELP = ", ".join(f"{' | '.join(names)} ({kind} runs)" for kind, names in SAMPLERS.items()) + "."
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def fail(message: str, code: int = 2, rank_local: bool = False) -> None:
    """Print each line of a user-facing error and exit (2 = bad input), without a traceback. Under torchrun only
    rank 0 prints, unless the error is this rank's own (`rank_local`, already prefixed `rank R:`)."""
    if rank_local or not other_rank():
        for line in str(message).splitlines() or ["unknown error"]:
            err.print(f"[red]error:[/red] {escape(line)}", markup=True)
    raise typer.Exit(code)


def _env_whole(name: str) -> int | None:
    """A launcher variable as an integer; None when unset or not a whole number (distributed.env_int reports it)."""
    try:
        return int(os.environ.get(name, "").strip())
    except ValueError:
        return None


def several_processes() -> bool:
    """torchrun started this process as one of several (read from the environment: torch is not imported). A
    WORLD_SIZE that is not a number counts as one process, so this process prints the error distributed gives."""
    return (_env_whole("WORLD_SIZE") or 1) > 1


def other_rank() -> bool:
    return several_processes() and (_env_whole("RANK") or 0) != 0


def _report(error: BaseException, code: int) -> None:
    """fail() with the line this rank reports for `error` (distributed.error_line); silent when rank 0 reports it."""
    if not several_processes():
        fail(str(error), code)
    from .distributed import error_line

    line = error_line(error)
    if line is None:
        raise typer.Exit(code)
    fail(line, code, rank_local=other_rank())


def joins_process_group(command: Callable) -> Callable:
    """Under torchrun (several processes): run the command inside the process group (distributed.session), ranks
    other than 0 printing nothing but their own errors. Otherwise the command is called unchanged."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        check_launcher_env()
        if not several_processes():
            return command(*args, **kwargs)
        from .distributed import session

        out.quiet = other_rank()
        with session():
            return command(*args, **kwargs)

    return wrapper


def exit_now(code: int) -> None:
    """End the process with `code` after flushing Python's output streams and logging, skipping the interpreter's
    teardown (atexit hooks, C++ destructors). Only for the end of a command run under torchrun: its loggers,
    files and process group are closed by then (see cli.main)."""
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said on it
            pass
    os._exit(code)


def check_launcher_env() -> None:
    """A UserError naming WORLD_SIZE, RANK or LOCAL_RANK when one is set to something torchrun never sets (text, a
    negative number): one line, not a ValueError from deep inside (distributed.env_int)."""
    if any(os.environ.get(name, "").strip() for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK")):
        from .distributed import LAUNCHER_VARIABLES, env_int

        for name, lowest in LAUNCHER_VARIABLES.items():
            env_int(name, lowest)


def one_process(command: str) -> None:
    """Refuse, under torchrun, a command that does not share its work between processes."""
    check_launcher_env()
    if several_processes():
        fail(f"`immiscible {command}` runs in one process; start it without torchrun (train and eval use several)")


def on_rank0(step: Callable):
    """step() on rank 0, its result (or error) on every rank (distributed.on_main); step() in one process."""
    if not several_processes():
        return step()
    from .distributed import on_main

    return on_main(step)


def reports_user_errors(command: Callable) -> Callable:
    """Turn a UserError (or an OSError, or running out of memory) raised below a command into `error: ...` and its
    exit code (errors.py)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as e:
            _report(e, e.exit_code)
        except OSError as e:  # an unexpected file-system refusal: disk full, read-only, name too long
            err_ = describe_os_error(e)
            _report(err_, err_.exit_code)
        except (MemoryError, RuntimeError) as e:  # memory ran out where no batch field was named
            if not is_out_of_memory(e):
                raise
            fail("out of memory; lower the batch size of this step (train.batch_size, eval.batch_size, "
                 "sample.batch_size or --batch)", EXIT_ENVIRONMENT)

    return wrapper


def command(epilog: str, name: str | None = None) -> Callable:
    """Mark a function as a command of the app with its help's Examples block (`epilog`) and its name (default:
    the function's); cli.py registers the marked commands with Typer, in the order `immiscible --help` lists
    them."""

    def mark(function: Callable) -> Callable:
        function.typer_command = {"name": name, "epilog": epilog}
        return function

    return mark


def examples(*pairs: str) -> str:
    """An Examples block for a command's help: alternating comment and command lines."""
    lines = []
    for i, text in enumerate(pairs):
        lines.append(f"[dim]# {text}[/dim]" if i % 2 == 0 else f"[cyan]{text}[/cyan]")
    return "[b]Examples[/b]\n\n" + "\n\n".join(lines)


PresetOpt = Annotated[Optional[str], typer.Option("--preset", "-p", help="Preset name (see `immiscible presets`) "
                                                  "or path to a YAML file. Default: quickstart.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", metavar="SECTION.FIELD=VALUE",
                                                     help="Override one field; VALUE is parsed as YAML. Repeatable.")]
SamplingSetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", "-s", metavar="SECTION.FIELD=VALUE", help="Change how images are drawn or scored: a sample.* or eval.* "
    "field (e.g. sample.eta=0.5, sample.start_std=0.98); VALUE is parsed as YAML. Repeatable.")]
VaeOpt = Annotated[Optional[Path], typer.Option("--vae", help="Runs on latents: the VAE folder that decodes the "
                                                "images (default: the one recorded in meta.json); it must hold the "
                                                "recorded config.json and weights.")]
InceptionOpt = Annotated[Optional[Path], typer.Option("--inception", help="FID Inception weights (TorchScript or "
                                                      "state_dict); also IMMISCIBLE_INCEPTION.")]
