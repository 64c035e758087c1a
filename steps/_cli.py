"""Shared command plumbing: options generated from the config dataclasses, and error handling.

A PipelineError is printed as one line on stderr and exits with status 2; set
PIPELINE_DEBUG=1 (or pass --debug) to see the full traceback instead. Under torchrun rank 0 prints
it; another rank prints only an error of its own that rank 0 did not report.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import sys

import click

from pipeline.config import AUTO
from pipeline.distributed import is_raised_on_every_rank, mark_raised_on_every_rank, read_world
from pipeline.errors import PipelineError
from pipeline.track.preflight import check_tracking_server, describe_machine_error
from pipeline.track.tracking import describe_interrupted_run, last_run_id

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class RecipeValue(click.ParamType):
    """A recipe option's value: `auto` (None: the arch's recipe, pipeline.config.recipes) or one of `kind`."""

    def __init__(self, kind: type):
        self.inner = {bool: click.BOOL, int: click.INT, float: click.FLOAT, str: click.STRING}[kind]
        self.name = f"auto|{self.inner.name}"

    def convert(self, value, param, ctx):
        if value is None or value == AUTO:
            return None
        return self.inner.convert(value, param, ctx)


def config_options(config_cls, exclude: tuple[str, ...] = (), defaults: dict | None = None):
    """click options for every field of a config dataclass, help and defaults taken from it."""
    defaults = defaults or {}

    def decorate(fn):
        for f in reversed(dataclasses.fields(config_cls)):
            if f.name in exclude:
                continue
            default = defaults.get(f.name, f.default)
            flag = "--" + f.name.replace("_", "-")
            kind = type(f.default)
            if "recipe" in f.metadata:  # None = auto, MLflow passes the word
                option = click.option(flag, f.name, type=RecipeValue(f.metadata["recipe"]),
                                      default=AUTO if default is None else default, show_default=True,
                                      help=f.metadata.get("help"))
            elif kind is bool:
                # MLflow passes every parameter as `--name value`, so booleans take a value too.
                option = click.option(
                    flag, f.name, type=click.BOOL, default=default, show_default=True, help=f.metadata.get("help")
                )
            else:
                option = click.option(
                    flag, f.name, type=kind, default=default, show_default=True, help=f.metadata.get("help")
                )
            fn = option(fn)
        return fn

    return decorate


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def handle_errors(fn=None, *, torchrun: bool = False, tracking: bool = True):
    """Turn PipelineError and faults of the machine into one line + exit 2, Ctrl-C/SIGTERM into exit 130.

    torchrun=True: the command may run as several processes under torchrun (pretrain, finetune);
    the other commands refuse to, rather than run once per process.
    tracking=True: an http(s) tracking server is asked once, briefly, before any work
    (MLflow's own client would retry for minutes); commands that never track pass False.
    An OS error such as a full disk or a lost tracking server, anywhere in an exception's chain, is
    one line too; any other exception keeps its traceback.
    """
    if fn is None:
        return functools.partial(handle_errors, torchrun=torchrun, tracking=tracking)

    @click.option("--debug", is_flag=True, default=False, help="show full tracebacks (also PIPELINE_DEBUG=1)")
    @functools.wraps(fn)
    def wrapper(*args, debug: bool = False, **kwargs):
        debug = debug or os.environ.get("PIPELINE_DEBUG", "") not in ("", "0")
        # Per-file download bars drown the epoch progress; our own bars say what is happening.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        # SIGTERM (pre-emption, `kill`) takes the Ctrl-C path: the run ends KILLED, and the last
        # finished epoch's checkpoint is already in the run's artifacts for `resume`.
        signal.signal(signal.SIGTERM, _raise_interrupt)
        world = read_world()
        runs_before = last_run_id()
        try:
            if world.size > 1 and not torchrun:
                raise mark_raised_on_every_rank(
                    PipelineError("this step runs as one process; only pretrain and finetune run under torchrun")
                )
            if tracking:
                check_tracking_server()
            return fn(*args, **kwargs)
        except PipelineError as exc:
            if debug:
                raise
            if world.is_main:
                click.echo(f"error: {exc}", err=True)
            elif not is_raised_on_every_rank(exc):
                click.echo(f"error: [rank {world.rank}] {exc}", err=True)
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            if world.is_main:  # the other ranks have no run
                click.echo(describe_interrupted_run(runs_before), err=True)
            sys.exit(EXIT_INTERRUPTED)
        except Exception as exc:
            line = None if debug else describe_machine_error(exc)
            if line is None:  # our bug, or one we cannot name: the traceback is the useful part
                raise
            click.echo(f"error: {line}" + ("" if world.is_main else f" [rank {world.rank}]"), err=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper

