"""``jema --help`` and each command's ``--help``: plain text, and every option names its default."""

import re

import pytest

from jema._app.cli import main


def help_text(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exited:
        main([*args, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


def commands(capsys) -> list[str]:
    """The commands ``jema --help`` lists in its usage line, ``{bench,...,posthoc}``."""
    found = re.search(r"\{([a-z,-]+)\}", help_text(capsys))
    assert found is not None
    return found.group(1).split(",")


def option_entries(text: str) -> dict[str, str]:
    """The ``options:`` section as option -> its help (continuation lines joined)."""
    entries: dict[str, str] = {}
    section = text.partition("\noptions:\n")[2]
    for line in section.splitlines():
        head = re.match(r"  (-[-\w]+)(?:, (--[-\w]+))?", line)
        if head:
            current = head.group(2) or head.group(1)
            entries[current] = line[head.end() :]
        elif line.startswith("    "):
            entries[current] += " " + line.strip()
    return entries


def test_the_commands_are_the_ones_the_cli_runs(capsys):
    assert commands(capsys) == [
        "bench",
        "bench-scale",
        "bench-posthoc",
        "bench-interop",
        "inspect",
        "demo",
        "posthoc",
    ]


def test_help_is_plain_text_without_rest_markup(capsys):
    for args in ([], *([name] for name in commands(capsys))):
        text = help_text(capsys, *args)
        assert "`" not in text and "::" not in text, (args, text)
    assert "The jema command line: demo, inspect CKPT, posthoc DIR" in help_text(capsys)


def test_every_option_of_every_command_names_its_default(capsys):
    for args in ([], *([name] for name in commands(capsys))):
        text = help_text(capsys, *args)
        usage = text.partition("\n\n")[0]
        entries = option_entries(text)
        assert set(re.findall(r"--[-\w]+", usage)) <= set(entries), (args, text)
        del entries["--help"]
        for option, explained in entries.items():
            assert re.search(r"\(default: [^)]+\)", explained), (args, option, explained)


@pytest.mark.parametrize(
    ("args", "option", "default"),
    [
        ((), "--version", "(default: off)"),
        (("demo",), "--epochs", "(default: 12)"),
        (("demo",), "--decay-type", "(default: threshold)"),
        (("demo",), "--out", "(default: jema-demo)"),
        (("demo",), "--kd", "(default: off)"),
        (("posthoc",), "--step", "(default: the latest snapshot)"),
        (("bench",), "--params", "(default: 25000000)"),
        (("bench-interop",), "--megabytes", "(default: 360)"),
    ],
)
def test_defaults_shown_are_the_values_used(capsys, args, option, default):
    assert option_entries(help_text(capsys, *args))[option].endswith(default)


def test_each_command_says_what_it_does_in_its_own_help(capsys):
    assert "\ndescribe a PyTorch/safetensors checkpoint\n" in help_text(capsys, "inspect")
    assert "\ntrain a digits CNN with EMA" in help_text(capsys, "demo")
