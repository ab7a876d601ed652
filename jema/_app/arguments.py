"""The command line's argparse pieces: a parser with one-line usage errors and plain-text help
naming every option's default, and types that refuse a bad value with a line naming it."""

from __future__ import annotations

import argparse
import os
import re
from typing import Any, NoReturn

from jema._power import SIGMA_REL_MAX, SIGMA_REL_MIN, check_sigma_rel


def plain(text: str) -> str:
    """reST text as plain text: a double-backquoted literal loses its backquotes.

    Args:
      text: a docstring line or help text.

    Returns:
      The text for a terminal.

    Example:
      >>> plain("The ``jema`` command line")
      'The jema command line'
    """
    return re.sub(r"``(.+?)``", r"\1", text, flags=re.S)


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help in plain text (``plain``), each option's help ending with its default:
    ``(default: off)`` for a flag, ``(default: <value>)`` otherwise, unless the help says it."""

    def _format_text(self, text: str) -> str:
        return super()._format_text(plain(text))

    def _get_help_string(self, action: argparse.Action) -> str:
        text = plain(action.help or "")
        default = action.default
        if not action.option_strings or default in (argparse.SUPPRESS, None) or "(default:" in text:
            return text  # an option whose default is None says what that means itself
        shown = "off" if action.nargs == 0 and default is False else "%(default)s"
        return f"{text} (default: {shown})"


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line on stderr, exit status 2, and
    whose help is ``HelpFormatter``'s (its subcommands' too).

    Example:
      >>> Parser(prog="jema").prog
      'jema'
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Print ``prog: message`` and exit with status 2 (argparse's usage-error status).

        Args:
          message: what is wrong, naming the flag.

        Raises:
          SystemExit: always, with status 2.

        Example:
          >>> Parser(prog="jema").parse_args(["--nope"])
          Traceback (most recent call last):
          SystemExit: 2
        """
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def bench_parser(prog: str, description: str, repeats: int) -> Parser:
    """The parser every benchmark starts from: ``--repeats``, ``--params``, ``--leaves``.

    Args:
      prog: the command, e.g. ``"jema bench"``.
      description: its one-line description.
      repeats: the default number of timed runs per row.

    Returns:
      The parser; a benchmark adds its own options.

    Example:
      >>> bench_parser("jema bench", "speed", 20).parse_args([]).params
      25000000
    """
    parser = Parser(prog=prog, description=description)
    parser.add_argument("--repeats", type=positive_int, default=repeats, help="timed runs per row")
    parser.add_argument(
        "--params", type=positive_int, default=25_000_000, help="total float32 weights"
    )
    parser.add_argument("--leaves", type=positive_int, default=100, help="number of leaves")
    return parser


def positive_int(text: str) -> int:
    """argparse type for counts such as ``--repeats``: an int of at least 1.

    Args:
      text: the command-line value.

    Returns:
      The int.

    Raises:
      argparse.ArgumentTypeError: for anything else, naming the value.

    Example:
      >>> positive_int("3")
      3
    """
    return _int_at_least(text, 1, "a positive int")


def non_negative_int(text: str) -> int:
    """argparse type for seeds: an int of at least 0.

    Args:
      text: the command-line value.

    Returns:
      The int.

    Raises:
      argparse.ArgumentTypeError: for anything else, naming the value.

    Example:
      >>> non_negative_int("0")
      0
    """
    return _int_at_least(text, 0, "a non-negative int")


def output_folder(text: str) -> str:
    """argparse type for ``--out``: a folder that exists or can be made, and written to.

    Nothing is created here; the command makes the folder once all its settings are good.

    Args:
      text: the command-line value.

    Returns:
      ``text``.

    Raises:
      argparse.ArgumentTypeError: for an empty value, a path that is a file (or lies under
        one), or a place this user cannot write to.

    Example:
      >>> output_folder("jema-demo")
      'jema-demo'
    """
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a folder; got an empty path")
    existing = os.path.abspath(text)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a folder ({existing!r} is a file); pass a folder to write into"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(
            f"cannot write into {existing!r} (to make or fill {text!r}); pick a writable folder"
        )
    return text


def _int_at_least(text: str, least: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = least - 1
    if value < least:
        raise argparse.ArgumentTypeError(f"must be {what}; got {text!r}")
    return value


def sigma_rel(text: str) -> float:
    """argparse type for ``--sigma-rel``: a width in (0, 1/√12).

    Args:
      text: the command-line value.

    Returns:
      The width.

    Raises:
      argparse.ArgumentTypeError: for anything else, naming the value.

    Example:
      >>> sigma_rel("0.07")
      0.07
    """
    try:
        return check_sigma_rel(float(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"must be a width in [{SIGMA_REL_MIN:g}, {SIGMA_REL_MAX:.4f}); got {text!r}"
        ) from e
