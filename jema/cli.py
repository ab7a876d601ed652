"""The ``jema`` command line: ``jema demo``, ``jema bench``, ``jema inspect CKPT``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from jema.bench import positive_int
from jema.demo import DemoConfig


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
    bench.add_argument("--repeats", type=positive_int, default=20, help="timed runs per row")

    inspect = commands.add_parser("inspect", help="describe a PyTorch/safetensors checkpoint")
    inspect.add_argument("checkpoint", help="path to a .pth/.pt or .safetensors file")

    demo = commands.add_parser("demo", help="train a digits CNN with EMA; plot, checkpoints, .pth")
    defaults = DemoConfig()
    demo.add_argument(
        "--epochs", type=positive_int, default=defaults.epochs, help="passes over the data"
    )
    demo.add_argument("--decay", type=float, default=defaults.decay, help="EMA decay, in (0, 1)")
    demo.add_argument("--decay-type", default=defaults.decay_type, help="registered schedule name")
    demo.add_argument("--out", default=defaults.out, help="output folder")
    demo.add_argument("--kd", action="store_true", help="distill a student from a teacher")
    demo.add_argument("--seed", type=int, default=defaults.seed, help="initialisation and batches")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")

    args = parser.parse_args(argv)
    if args.command == "bench":
        from jema.bench import run

        run(repeats=args.repeats)
        return 0
    if args.command == "inspect":
        return _inspect(args.checkpoint)
    if args.command == "demo":
        return _demo(args)
    parser.error(f"unknown command {args.command!r}")
    return 2


def _demo(args: argparse.Namespace) -> int:
    from jema.demo import run

    config = DemoConfig(
        epochs=args.epochs,
        decay=args.decay,
        decay_type=args.decay_type,
        out=args.out,
        kd=args.kd,
        seed=args.seed,
        progress=not args.no_progress,
    )
    try:
        summary = run(config)
    except ImportError as e:
        print(f"jema demo needs its extras: pip install 'jema[demo]' ({e})", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as e:
        print(f"jema demo: {e}", file=sys.stderr)
        return 2
    for kind, path in summary["files"].items():
        print(f"wrote {kind}: {path}")
    return 0 if summary["torch_agrees"] is not False else 1


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
