"""``remat``: parse the command line, run the command, turn Ctrl-C and SIGTERM into one
line and an exit status."""

from __future__ import annotations

import signal
import sys
from typing import Any

from remat.cli.common import Terminated
from remat.cli.parsing import build_parser

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run ``remat`` with ``argv`` (``sys.argv[1:]`` when ``None``) and return the exit status.

    Ctrl-C and SIGTERM end it with one line on stderr (exit 130 and 143), its workers and
    temporary folders removed.

    Example:
        >>> main(["bench", "--batch", "64", "--quiet", "--json", "bench.json"])  # doctest: +SKIP
        0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, usage errors: argparse's own status
        return int(exit_.code or 0)
    if args.command is None:
        parser.print_help()
        return 2

    def terminated(signum: int, frame: Any) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(f"remat {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"remat {args.command}: terminated", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)
