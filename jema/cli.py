"""The ``jema`` command line: ``jema bench``, ``jema inspect CKPT``, ``jema demo``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``jema`` command line.

    Args:
      argv: the arguments after the program name; None reads ``sys.argv``.

    Returns:
      The exit status.

    Example:
      >>> main(["inspect", "no-such-file.pth"])  # the error goes to stderr
      1
    """
    parser = argparse.ArgumentParser(prog="jema", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser("bench", help="measure the EMA update's speed (prints a table)")
    bench.add_argument("--repeats", type=int, default=20, help="timed runs per row")

    inspect = commands.add_parser("inspect", help="describe a PyTorch/safetensors checkpoint")
    inspect.add_argument("checkpoint", help="path to a .pth/.pt or .safetensors file")

    args = parser.parse_args(argv)
    if args.command == "bench":
        from jema.bench import run

        run(repeats=args.repeats)
        return 0
    if args.command == "inspect":
        return _inspect(args.checkpoint)
    parser.error(f"unknown command {args.command!r}")
    return 2


def _inspect(path: str) -> int:
    try:
        from interop import inspect_checkpoint
    except ImportError as e:
        print(f"jema inspect needs PyTorch: pip install 'jema[torch]' ({e})", file=sys.stderr)
        return 2
    try:
        print(inspect_checkpoint(path))
    except (OSError, ValueError) as e:
        print(f"jema inspect: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
