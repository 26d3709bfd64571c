"""Command-line plumbing shared by every command: typed dataclass flags, the flags both training
commands share (`RunArgs`), one-line errors and the --debug escape hatch."""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import typing
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional, Sequence, TypeVar

from ..device import PRECISIONS
from ..errors import ConfigError, MinigptError
from ..training.config import SCHEDULES, TrainConfig
from ..training.optim import MUON_LR_SCALE, OPTIMIZERS

T = TypeVar("T")


class CLIError(ConfigError):
    """A bad flag or combination of flags: printed as one line, exit code 1."""


def field(default, help: str, **meta):
    """dataclasses.field with a help string (and optional choices / metavar) for parse_args."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **meta})
    return dataclasses.field(default=default, metadata={"help": help, **meta})


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _Help(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout; adds "(default: X)" only where there is a default to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, [], argparse.SUPPRESS) or "default" in text or not action.option_strings \
                or "--help" in action.option_strings:
            return text
        return f"{text} (default: {action.default})"


def _base_type(tp):
    origin = typing.get_origin(tp)
    if origin is typing.Union or str(origin) == "types.UnionType":
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _add_flag(p: argparse.ArgumentParser, f: dataclasses.Field, tp) -> None:
    flag = "--" + f.name.replace("_", "-")
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    help_ = f.metadata.get("help", "")
    if tp is bool:
        p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
    elif typing.get_origin(tp) in (list, tuple):
        p.add_argument(flag, nargs="+", action="extend", type=typing.get_args(tp)[0], default=None,
                       metavar=f.metadata.get("metavar"), help=help_ + " (repeatable)")
    else:
        choices = f.metadata.get("choices")
        metavar = f.metadata.get("metavar") or (None if choices else {int: "N", float: "X"}.get(tp))
        p.add_argument(flag, type=tp, default=default, help=help_, choices=list(choices) if choices else None,
                       metavar=metavar)


def parse_args(cls: type[T], argv: Optional[Sequence[str]], doc: str = "", prog: Optional[str] = None) -> T:
    """Build an argparse parser from a dataclass (field metadata 'help'), parse argv into it.

    `doc`: the command's docstring: its first paragraph is the description, the rest the epilog.
    Field `foo_bar: bool = False` becomes `--foo-bar` / `--no-foo-bar`; list fields are repeatable.
    The dataclass validates itself (__post_init__); its error becomes one usage line, exit 2.
    """
    hints = typing.get_type_hints(cls)
    description, _, epilog = doc.strip().partition("\n\n")
    p = _Parser(prog=prog, description=description, epilog=epilog or None, formatter_class=_Help)
    for f in dataclasses.fields(cls):
        _add_flag(p, f, _base_type(hints[f.name]))
    ns = p.parse_args(argv)
    for f in dataclasses.fields(cls):  # list flags start empty so that repeating them adds up
        if getattr(ns, f.name) is None and typing.get_origin(_base_type(hints[f.name])) in (list, tuple):
            setattr(ns, f.name, f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
    try:
        return cls(**vars(ns))
    except ValueError as e:
        p.error(str(e))


def run_main(fn: Callable[[], object], debug: bool) -> int:
    """Run a command body; a MinigptError or an OSError of the machine (disk full, no permission)
    becomes one line and exit code 1, Ctrl-C exit code 130 (tracebacks with --debug). The exit code
    is the body's result when it is an int, else 0."""
    try:
        rc = fn()
        return rc if isinstance(rc, int) else 0
    except (MinigptError, OSError) as e:
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


def command_main(cls: type[T], body: Callable[[T], object], argv, doc: str, prog: str,
                 training: bool = False) -> int:
    """A command's main(argv): parse argv into `cls`, run body(args) under run_main."""
    args = parse_args(cls, argv, doc, prog=prog)
    if training:
        from ..device import reuse_freed_memory

        reuse_freed_memory()   # large per-step tensors: keep freed memory instead of re-faulting it
    return run_main(lambda: body(args), args.debug)


def check(ok: bool, flag: str, rule: str, value) -> None:
    """Raise ConfigError "--flag must be RULE, got VALUE" unless ok."""
    if not ok:
        raise ConfigError(f"--{flag.replace('_', '-')} must be {rule}, got {value!r}")


@dataclass
class RunArgs:
    """The flags both training commands share. A command's class sets its own defaults and help
    texts for them in DEFAULTS / HELP (they become its fields: TrainArgs().lr is train's default)."""

    DEFAULTS: ClassVar[dict] = {}
    HELP: ClassVar[dict] = {}

    data: Optional[str] = field(None, "training data")
    out_dir: str = field("out", "where checkpoints, metrics and the result go")
    max_steps: Optional[int] = field(None, "optimizer steps")
    batch_size: int = field(16, "sequences (examples) per micro-batch")
    grad_accum: int = field(1, "micro-batches per optimizer step")
    lr: float = field(1e-3, "peak learning rate")
    min_lr: Optional[float] = field(None, "final learning rate (default: 0 for linear decay, lr / 10 for cosine)")
    warmup_steps: Optional[int] = field(None, "linear warmup steps (default: 5%% of the steps)")
    schedule: str = field("cosine", "learning-rate decay", choices=SCHEDULES)
    weight_decay: float = field(0.1, "decoupled weight decay (matrices only)")
    optimizer: str = field("adamw", "adamw, or muon: Muon on the hidden weight matrices (their updates "
                                    "orthogonalised), AdamW on embeddings, head, biases and gains",
                           choices=OPTIMIZERS)
    muon_lr: Optional[float] = field(None, f"Muon's peak learning rate (default: {MUON_LR_SCALE:g} x --lr)")
    grad_clip: float = field(1.0, "max gradient norm (0 = off)")
    eval_interval: int = field(100, "steps between evaluations")
    save_interval: Optional[int] = field(None, "steps between checkpoints (default: --eval-interval)")
    eval_batches: Optional[int] = field(10, "validation batches per evaluation (0 = no evaluation)")
    log_interval: int = field(10, "steps between metric records")
    keep_last: int = field(2, "checkpoints to keep")
    precision: str = field("auto", "auto (bf16 on CUDA and on CPUs with native bf16, else fp32), "
                                   "fp32, bf16 or fp16", choices=PRECISIONS)
    compile: bool = field(False, "torch.compile the model")
    device: str = field("auto", "auto, cpu, cuda or cuda:N")
    threads: Optional[int] = field(None, "CPU threads for torch (default: all cores)")
    seed: int = field(0, "random seed (init, dropout, data order and split)")
    resume: bool = field(False, "continue from the newest checkpoint in --out-dir")
    overwrite: bool = field(False, "start over in an --out-dir that holds an earlier run (deletes it)")
    val_fraction: float = field(0.1, "share of the data held out for validation")
    samples: int = field(3, "text samples shown at the end (0 = none)")
    sample_tokens: int = field(64, "max new tokens per sample")
    debug: bool = field(False, "show tracebacks")

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)                      # runs before @dataclass sees cls
        own, shared, hints = vars(cls), RunArgs.__dataclass_fields__, typing.get_type_hints(RunArgs)
        annotations = dict(own.get("__annotations__", {}))
        for name in {**own.get("DEFAULTS", {}), **own.get("HELP", {})}:
            meta = {**shared[name].metadata, "help": own.get("HELP", {}).get(name, shared[name].metadata["help"])}
            default = own.get("DEFAULTS", {}).get(name, shared[name].default)
            setattr(cls, name, dataclasses.field(default=default, metadata=meta))
            annotations[name] = hints[name]
        cls.__annotations__ = annotations

    def __post_init__(self) -> None:
        TrainConfig.validate(self)
        for name in ("threads",):
            v = getattr(self, name)
            check(v is None or v >= 1, name, "a positive integer", v)
        for name in ("eval_batches", "samples"):
            v = getattr(self, name)
            check(v is None or v >= 0, name, ">= 0", v)
        check(self.sample_tokens >= 1, "sample_tokens", ">= 1", self.sample_tokens)
        check(0 <= self.seed < 2 ** 63, "seed", "in [0, 2**63)", self.seed)
        check(math.isfinite(self.val_fraction), "val_fraction", "a finite number", self.val_fraction)
        if self.resume and self.overwrite:
            raise CLIError("use either --resume (continue the run in --out-dir) or --overwrite (start over), not both")
