"""What every ``remat`` command shares: its one-line errors, the output paths checked
before minutes of work, the model size flags, and SIGTERM as an exception."""

from __future__ import annotations

import argparse
import os
import sys

from remat.cli.help_texts import SIZE_FLAGS, SIZE_HELP

__all__ = ["Terminated", "add_size_flags", "error", "output_path_error", "sizes_given"]


class Terminated(Exception):
    """SIGTERM, turned into an exception so that cleanups run (workers, temp folders)."""


def error(message: str, command: str = "bench") -> int:
    print(f"remat {command}: error: {message}", file=sys.stderr)
    return 2


def output_path_error(flag: str, path: str | None) -> str | None:
    """Why ``path`` cannot be written (checked before minutes of work), or ``None``."""
    if not path:
        return None
    if os.path.isdir(path):
        return f"{flag} {path}: is a directory; give a file name"
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        return f"{flag} {path}: cannot create its directory ({e.strerror})"
    if not os.access(directory, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        return f"{flag} {path}: not writable"
    return None


def add_size_flags(parser: argparse.ArgumentParser, *, seq_len_auto: bool = False) -> None:
    """``--model-arg`` and the size flags; ``seq_len_auto``: ``--seq-len`` also takes
    ``auto`` (a string then, checked by the command)."""
    parser.add_argument(
        "--model-arg",
        dest="model_args",
        action="append",
        metavar="KEY=VALUE",
        help="repeatable: an option of your factory (layers=4), or a config field of an "
        "hf:<arch> model (num_key_value_heads=2); values are Python literals or strings",
    )
    sizes = parser.add_argument_group("model sizes (gpt and hf:<arch>)")
    for flag in SIZE_FLAGS:
        auto = seq_len_auto and flag == "seq_len"
        sizes.add_argument(
            f"--{flag.replace('_', '-')}",
            dest=flag,
            type=str if auto else int,
            metavar="N|auto" if auto else "N",
            help=SIZE_HELP[flag] + ("; auto: the longest that fits" if auto else ""),
        )


def sizes_given(args: argparse.Namespace) -> dict[str, int]:
    """The model size options given on the command line (``--layers`` -> ``n_layers``)."""
    sizes = {opt: getattr(args, flag) for flag, opt in SIZE_FLAGS.items()}
    return {k: v for k, v in sizes.items() if v is not None}
