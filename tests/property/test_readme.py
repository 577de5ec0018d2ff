"""The README's runnable example stays true."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_layout_engine_example_runs() -> None:
    text = README.read_text()
    block = re.search(r"## The layout engine in one example\n\n```python\n(.*?)```", text, re.S)
    assert block, "README lost its layout engine example"
    exec(compile(block.group(1), "README.md", "exec"), {})


def test_readme_names_the_commands_ci_runs() -> None:
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python3 -m pip install torch==2.13.0 -e ." in text and "python3 -m pip install -q torch==2.13.0 -e ." in ci
    assert "python3 -m pytest  " in text or "python3 -m pytest\n" in text
    assert ci.rstrip().endswith("python3 -m pytest")
