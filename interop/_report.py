"""What did not line up in a conversion, collected and reported at once."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

_NOTES = ("tied", "torch_only")  # fields that say what was done, not what went wrong


@dataclasses.dataclass(frozen=True)
class Report:
    """What a conversion found, each tuple sorted: mismatches, then notes.

    Attributes:
      missing: what the destination needs and the source lacks.
      unexpected: what the source holds and the destination has no place for.
      shapes: pairs matched by name whose shapes differ.
      dtypes: pairs whose dtypes differ (no silent casts), or dtypes outside the table.
      conflicts: PyTorch keys of one shared tensor that would get different values.
      tied: notes, ``<key>: tied to <key>``: PyTorch keys that alias a tensor already converted
        (a GPT-2 ``lm_head.weight`` and its ``wte.weight``), loaded once, or written from their
        source's value.
      torch_only: notes: PyTorch tensors with no Flax twin (``num_batches_tracked``, index
        tables, masks, sinusoidal position tables, a module's other buffers), left out when
        loading, taken from the template when saving.
    """

    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    shapes: tuple[str, ...] = ()
    dtypes: tuple[str, ...] = ()
    conflicts: tuple[str, ...] = ()
    tied: tuple[str, ...] = ()
    torch_only: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when nothing is missing, unexpected or mismatched (notes aside)."""
        return not any(v for k, v in dataclasses.asdict(self).items() if k not in _NOTES)

    def __str__(self) -> str:
        lines = []
        for title, items in dataclasses.asdict(self).items():
            if items:
                lines.append(f"{len(items)} {title.replace('_', '-')}:")
                lines += [f"  {item}" for item in items]
        return "\n".join(lines) or "all keys matched"


class Converted(NamedTuple):
    """What non-strict conversions return: the converted value and its report."""

    value: Any
    report: Report


@dataclasses.dataclass
class Problems:
    """Accumulates mismatches while converting."""

    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    shapes: list[str] = dataclasses.field(default_factory=list)
    dtypes: list[str] = dataclasses.field(default_factory=list)
    conflicts: list[str] = dataclasses.field(default_factory=list)
    tied: list[str] = dataclasses.field(default_factory=list)
    torch_only: list[str] = dataclasses.field(default_factory=list)

    def report(self) -> Report:
        """The mismatches so far, each kind sorted.

        Returns:
          A ``Report``.

        Example:
          >>> problems = Problems(missing=["b", "a"])
          >>> problems.report().missing
          ('a', 'b')
        """
        return Report(*(tuple(sorted(v)) for v in dataclasses.asdict(self).values()))

    def finish(self, value: Any, strict: bool, what: str) -> Any:
        """Ends a conversion: strict returns ``value`` or raises, non-strict reports.

        Args:
          value: the converted value.
          strict: raise on mismatches, else return ``Converted(value, report)``.
          what: names the source in the error, e.g. ``"the state_dict"``.

        Returns:
          ``value`` (strict) or ``Converted(value, report)``.

        Raises:
          ValueError: in strict mode, listing every mismatch, sorted.

        Example:
          >>> Problems(unexpected=["fc.bias"]).finish({}, False, "the state_dict").report.ok
          False
        """
        report = self.report()
        if not strict:
            return Converted(value, report)
        if not report.ok:
            raise ValueError(f"{what} does not match:\n{report}\n{hint(report)}")
        return value


def hint(report: Report) -> str:
    """What can help with a report's mismatches, and only that.

    Names that differ (missing, unexpected) get ``rename`` and ``match_by_order``; shapes that
    differ under matching names get the sizes to fix, each line having given the layout rule
    that produced the expected shape; dtypes say ``cast=True`` on their own lines.

    Args:
      report: a report with mismatches.

    Returns:
      The hint, one or more sentences.

    Example:
      >>> hint(Report(dtypes=("fc.bias: float64 in the state_dict, float32 in the template",)))
      'Pass strict=False to get the rest with this report.'
      >>> hint(Report(shapes=("fc.bias: (3,) in the state_dict, (2,) for params/fc/bias",)))[:40]
      'Names match where shapes differ: build t'
    """
    hints = []
    if report.missing or report.unexpected:
        hints.append(
            "Names differ: pass rename={pattern: replacement} (regex rules turning PyTorch "
            "names into the Flax side's default names, e.g. {r'^backbone\\.': ''}), or "
            "match_by_order=True for linen variables from an eager model.init."
        )
    if report.shapes:
        hints.append(
            "Names match where shapes differ: build the Flax modules with PyTorch's sizes "
            "(features, kernel size, groups, heads)."
        )
    if report.conflicts:
        hints.append("Tied keys hold one tensor: give their Flax leaves equal values.")
    hints.append(f"{'Or p' if hints else 'P'}ass strict=False to get the rest with this report.")
    return " ".join(hints)


def few(names: Sequence[str], most: int) -> str:
    """The first ``most`` of ``names``, comma-separated, and how many more there are.

    Args:
      names: already formatted names (quote them first if the message should).
      most: how many to show.

    Returns:
      A short text for an error or a report.

    Example:
      >>> few(["a", "b", "c"], most=2)
      'a, b and 1 more'
    """
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more
