"""The README's Python API example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_training_snippet_runs_as_written():
    text = README.read_text()
    block = re.search(r"## Python API\n\n```python\n(.*?)```", text, re.S).group(1)
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 (our own documentation)
    assert scope["x"].shape == (16, 4, 8, 8) and scope["x2"].shape == (16, 4, 8, 8)
    assert bool(scope["loss"].isfinite())
