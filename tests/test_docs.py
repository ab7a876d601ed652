"""Every public function of jema's and interop's modules says its Args, Returns and Raises and
shows a runnable Example (run as a doctest by ``pytest --doctest-modules``)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import pkgutil
import textwrap

import pytest

import interop
import jema

PACKAGES = (jema, interop)


def _public_functions() -> list[tuple[str, object]]:
    found = []
    for package in PACKAGES:
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            if info.name.endswith("__main__"):
                continue
            try:
                module = importlib.import_module(info.name)
            except ModuleNotFoundError as e:
                if e.name != "torch" or importlib.util.find_spec("torch") is not None:
                    raise
                continue  # a module built on torch (the demo's twin), when torch is missing
            for name, value in vars(module).items():
                owners = [value] if inspect.isclass(value) else []
                functions = [(name, value)] if inspect.isfunction(value) else []
                for owner in owners:
                    functions += [(f"{name}.{k}", v) for k, v in vars(owner).items() if callable(v)]
                found += [
                    (f"{info.name}.{label}", f)
                    for label, f in functions
                    if not label.rpartition(".")[2].startswith("_")
                    and getattr(f, "__module__", None) == module.__name__
                ]
    return sorted(found)


FUNCTIONS = _public_functions()


def test_the_walk_finds_the_public_functions() -> None:
    names = {name for name, _ in FUNCTIONS}
    assert {
        "jema._schedules.decay_weights_fn",
        "jema._trees.average_tree",
        "jema.nnx.ema_weights",
        "jema._app.cli.main",
        "interop._report.Problems.finish",
        "interop._names.usable_names",
        "interop._files.write_atomic",
    } <= names


@pytest.mark.parametrize(("name", "function"), FUNCTIONS, ids=[n for n, _ in FUNCTIONS])
def test_public_function_is_documented_with_an_example(name: str, function) -> None:
    doc = inspect.getdoc(function) or ""
    signature = inspect.signature(function)
    wanted = ["Example:\n  >>> "]
    if [p for p in signature.parameters if p != "self"]:
        wanted.append("Args:\n")
    if signature.return_annotation not in ("None", None, "NoReturn"):
        generator = inspect.isgeneratorfunction(inspect.unwrap(function))
        wanted.append("Yields:\n" if generator else "Returns:\n")
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    if any(isinstance(node, ast.Raise) for node in ast.walk(tree)):
        wanted.append("Raises:\n")
    assert [w for w in wanted if w not in doc] == [], name
