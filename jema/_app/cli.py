"""The ``jema`` command line: ``demo``, ``inspect CKPT``, ``posthoc DIR`` and the benchmarks
``bench``, ``bench-scale``, ``bench-posthoc``, ``bench-interop``.

Output read only in part (``jema --help | head -1``) ends a command quietly, with status 0."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Sequence

from jema._app.about import foreign_interop, version_report
from jema._app.arguments import (
    Parser,
    non_negative_int,
    output_folder,
    positive_int,
    sigma_rel,
)
from jema._app.demo import DemoConfig

BENCHMARKS = {  # command: (module with a main(argv), help)
    "bench": ("jema._app.bench", "measure the EMA update's speed (prints a table)"),
    "bench-scale": (
        "jema._app.bench_scale",
        "measure a train step, sparse and sharded updates (prints a table)",
    ),
    "bench-posthoc": (
        "jema._app.bench_posthoc",
        "measure power_ema's fused update and reconstruct (prints a table)",
    ),
    "bench-interop": (
        "jema._app.bench_interop",
        "measure interop's saves and loads against torch's (prints a table)",
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``jema`` command line.

    Args:
      argv: the arguments after the program name; None reads ``sys.argv``.

    Returns:
      The exit status: 0 on success, 1 on a failure, 2 on a usage error (one line on stderr,
      no traceback, for both). A reader that closes stdout early (``| head -1``) gets 0 and
      no traceback: the rest of the output goes to ``os.devnull``.

    Example:
      >>> main(["inspect", "no-such-file.pth"])  # the error goes to stderr
      1
    """
    try:
        try:
            return _run(argv)
        finally:  # the last of the output, also before --help's SystemExit
            sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the exit's own flush then writes nowhere
        os.close(devnull)
        return 0


def _run(argv: Sequence[str] | None) -> int:
    parser = Parser(prog="jema", description=__doc__.partition("\n\n")[0])
    parser.add_argument(
        "--version", action="store_true", help="versions of jema and its stack; interop's origin"
    )
    commands = parser.add_subparsers(dest="command")

    for name, (_, help_text) in BENCHMARKS.items():
        commands.add_parser(name, help=f"{help_text}; see jema {name} --help", add_help=False)

    inspect = _command(commands, "inspect", "describe a PyTorch/safetensors checkpoint")
    inspect.add_argument(
        "checkpoint",
        help="path to a .pth/.pt or .safetensors file, or a Hugging Face folder "
        "(model.safetensors or pytorch_model.bin, or shards and their *.index.json)",
    )

    demo = _command(commands, "demo", "train a digits CNN with EMA; plot, checkpoints, .pth")
    defaults = DemoConfig()
    demo.add_argument(
        "--epochs", type=positive_int, default=defaults.epochs, help="passes over the data"
    )
    demo.add_argument("--decay", type=float, default=defaults.decay, help="EMA decay, in (0, 1)")
    demo.add_argument("--decay-type", default=defaults.decay_type, help="registered schedule name")
    demo.add_argument("--out", type=output_folder, default=defaults.out, help="output folder")
    demo.add_argument("--kd", action="store_true", help="distill a student from a teacher")
    demo.add_argument(
        "--seed", type=non_negative_int, default=defaults.seed, help="initialisation and batches"
    )
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")

    posthoc = _command(
        commands, "posthoc", "list the snapshots of a folder, or rebuild an EMA width from them"
    )
    posthoc.add_argument("directory", help="the folder jema.posthoc.save_snapshot wrote")
    action = posthoc.add_mutually_exclusive_group(required=True)
    action.add_argument("--list", action="store_true", help="list the snapshots")
    action.add_argument(
        "--sigma-rel",
        type=sigma_rel,
        help="the width to rebuild, e.g. 0.07 (default: none; --list or --sigma-rel is needed)",
    )
    posthoc.add_argument(
        "--step", type=positive_int, help="rebuild at this step (default: the latest snapshot)"
    )
    posthoc.add_argument(
        "--out",
        help="the file to write: .safetensors, or .pth in SG's layout, no torch needed "
        "(default: none; needed with --sigma-rel)",
    )
    posthoc.add_argument(
        "--torch-template",
        help="a .pth/.pt/.safetensors state_dict whose names to follow "
        "(default: none: names made from the Flax tree, e.g. fc.weight)",
    )
    posthoc.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in BENCHMARKS:  # each benchmark parses its own options
        benchmark = importlib.import_module(BENCHMARKS[argv[0]][0])
        return benchmark.main(argv[1:])
    args = parser.parse_args(argv)
    if args.version:
        print(version_report())
        return 0
    if args.command == "inspect":
        return _inspect(args.checkpoint)
    if args.command == "demo":
        return _demo(args)
    if args.command == "posthoc":
        if args.list and (args.out or args.step or args.torch_template):
            posthoc.error("--list takes no --out, --step or --torch-template")
        if args.sigma_rel is not None and not args.out:
            posthoc.error("--sigma-rel needs --out FILE (.pth or .safetensors)")
        return _posthoc(args)
    parser.error(f"a command is required: demo, inspect, posthoc or one of {', '.join(BENCHMARKS)}")


def _command(commands: argparse._SubParsersAction[Parser], name: str, summary: str) -> Parser:
    """A subcommand whose summary is both its line in ``jema --help`` and its own help's."""
    return commands.add_parser(name, help=summary, description=summary)


def _demo(args: argparse.Namespace) -> int:
    from jema._app.demo import run

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
        return 1
    except (ValueError, TypeError) as e:
        print(f"jema demo: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"jema demo: cannot write the outputs: {e}", file=sys.stderr)
        return 1
    for kind, path in summary["files"].items():
        print(f"wrote {kind}: {path}")
    return 0 if summary["torch_agrees"] is not False else 1


def _posthoc(args: argparse.Namespace) -> int:
    from jema._app.posthoc_cli import snapshot_table

    problem = None if args.list else foreign_interop()
    if problem:
        print(f"jema posthoc: interop {problem}", file=sys.stderr)
        return 1
    try:
        output = snapshot_table(args.directory) if args.list else _export(args)
    except (OSError, ValueError, TypeError) as e:
        print(f"jema posthoc: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 1
    print(output)
    return 0


def _export(args: argparse.Namespace) -> str:
    """``posthoc_cli.export`` of the options, its warnings on stderr once (not once per part)."""
    from jema._app.posthoc_cli import export
    from jema.posthoc import ExtrapolationWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExtrapolationWarning)
        written = export(
            args.directory,
            args.sigma_rel,
            args.out,
            step=args.step,
            torch_template=args.torch_template,
            progress=not args.no_progress,
        )
    for message in dict.fromkeys(str(w.message) for w in caught):
        print(f"jema posthoc: warning: {message}", file=sys.stderr)
    return written


def _inspect(path: str) -> int:
    problem = foreign_interop()
    if problem:
        print(f"jema inspect: interop {problem}", file=sys.stderr)
        return 1
    from interop import inspect_checkpoint

    try:
        report = inspect_checkpoint(path)
    except (OSError, ValueError) as e:
        print(f"jema inspect: {e}", file=sys.stderr)
        return 1
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
