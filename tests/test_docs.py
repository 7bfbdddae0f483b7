"""Every public name is documented, and every code example in the docs runs."""

import inspect
import itertools
import pathlib
import re
import textwrap

import pytest

import eqx_ggn


ROOT = pathlib.Path(__file__).parents[1]
FENCE = re.compile(r"```python\n(.*?)```", re.DOTALL)
PUBLIC = sorted(n for n in dir(eqx_ggn) if not n.startswith("_"))


def _examples(text):
    return [textwrap.dedent(block) for block in FENCE.findall(text)]


def _documented():
    """Every public name, and the public methods of the public classes."""
    for name in PUBLIC:
        obj = getattr(eqx_ggn, name)
        yield name, obj
        if inspect.isclass(obj):
            for method, value in vars(obj).items():
                if not method.startswith("_") and callable(value):
                    yield f"{name}.{method}", value


def _docstring_examples():
    for name, obj in _documented():
        for i, code in enumerate(_examples(inspect.getdoc(obj) or "")):
            yield pytest.param(code, id=f"{name}-{i}")


@pytest.mark.parametrize("name", PUBLIC)
def test_public_names_have_docstrings(name):
    obj = getattr(eqx_ggn, name)
    if callable(obj):
        assert inspect.getdoc(obj), f"eqx_ggn.{name} has no docstring"
        assert _examples(inspect.getdoc(obj)), f"eqx_ggn.{name} has no example"


@pytest.mark.parametrize("code", list(_docstring_examples()))
def test_docstring_example_runs(code):
    exec(compile(code, "<docstring>", "exec"), {})


def test_readme_examples_run():
    blocks = _examples((ROOT / "README.md").read_text())
    assert blocks, "README has no python example"
    for code in blocks:
        namespace = {}
        exec(compile(code, "README.md", "exec"), namespace)
        # A training loop's losses never rise (a rejected step repeats the value).
        losses = namespace.get("losses", [])
        assert all(b <= a for a, b in itertools.pairwise(losses)), losses
        assert not losses or losses[-1] < 0.1 * losses[0], losses
