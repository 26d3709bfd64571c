"""Shared command-line plumbing for train.py, finetune.py and chat.py: typed dataclass args,
one-line errors, and the --debug escape hatch."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import Callable, Optional, Sequence, TypeVar

from .errors import MinigptError

T = TypeVar("T")


class CLIError(MinigptError):
    """A bad combination of command-line flags: printed as one line, exit code 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _base_type(tp):
    origin = typing.get_origin(tp)
    if origin is typing.Union or str(origin) == "types.UnionType":
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def parse_args(cls: type[T], argv: Optional[Sequence[str]], description: str = "",
               prog: Optional[str] = None) -> T:
    """Build an argparse parser from a dataclass (field metadata 'help'), parse argv into it.

    Field `foo_bar: bool = False` becomes `--foo-bar` / `--no-foo-bar`.
    """
    hints = typing.get_type_hints(cls)
    p = _Parser(prog=prog, description=description,
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        tp = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = f.metadata.get("help", " ")
        if tp is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif typing.get_origin(tp) in (list, tuple):
            p.add_argument(flag, nargs="+", action="extend", type=typing.get_args(tp)[0], default=None,
                           help=help_ + " (repeatable)")
        else:
            choices = f.metadata.get("choices")
            p.add_argument(flag, type=tp, default=default, help=help_, choices=choices,
                           metavar=f.metadata.get("metavar"))
    ns = p.parse_args(argv)
    for f in dataclasses.fields(cls):  # list flags start empty so that repeating them adds up
        if getattr(ns, f.name) is None and typing.get_origin(_base_type(hints[f.name])) in (list, tuple):
            setattr(ns, f.name, f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
    try:
        return cls(**vars(ns))
    except (ValueError, TypeError) as e:
        p.error(str(e))


def run_main(fn: Callable[[], int | None], debug: bool) -> int:
    """Run a script body; turn expected failures into one-line errors (traceback with --debug)."""
    from .checkpoint import CheckpointError
    from .data import DataError
    from .trainer import TrainingStopped
    try:
        return fn() or 0
    except (CLIError, CheckpointError, DataError, TrainingStopped, FileNotFoundError, PermissionError, ValueError, OSError) as e:
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130


def field(default, help: str, **meta):
    """dataclasses.field with a help string for parse_args."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **meta})
    return dataclasses.field(default=default, metadata={"help": help, **meta})
