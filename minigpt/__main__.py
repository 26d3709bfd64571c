"""`minigpt <command> [flags]` / `python -m minigpt <command>`; `minigpt` alone prints `minigpt info`."""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from .commands import COMMANDS, run


def _usage() -> str:
    lines = ["usage: minigpt <command> [flags]   (minigpt <command> --help for its flags)", "", "commands:"]
    lines += [f"  {name:<10} {what}" for name, what in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        return run("info", [])
    name, rest = args[0], args[1:]
    if name in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if name not in COMMANDS:
        print(f"minigpt: error: unknown command {name!r}; choose from {', '.join(COMMANDS)} (see --help)",
              file=sys.stderr)
        return 2
    return run(name, rest)


def _main() -> int:
    """The console entry point: `minigpt ... | head` ends quietly when the reader goes away."""
    try:
        return main()
    except BrokenPipeError:
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error at exit
        return 0


if __name__ == "__main__":
    sys.exit(_main())
