"""Every Python block of the README runs as written (issue 22), each in a fresh namespace."""

import pathlib
import re

import pytest
import torch

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _blocks():
    text = README.read_text()
    for match in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
        line = text[: match.start()].count("\n") + 1
        yield pytest.param(match.group(1), id=f"README.md:{line}")


BLOCKS = list(_blocks())


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("source", BLOCKS)
def test_readme_block_runs(source):
    torch.manual_seed(0)
    namespace = {"__name__": "readme_block"}
    exec(compile(source, str(README), "exec"), namespace)  # noqa: S102 (our own README)
