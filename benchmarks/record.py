"""What every benchmark writes with its numbers: the commit it ran from, and the JSON file."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path


def git_commit() -> str | None:
    """Short hash of the checkout holding this file (None outside git)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        return None


def write_json(path, doc: dict) -> str:
    """Write doc as indented JSON to path (parents created); returns the text."""
    text = json.dumps(doc, indent=1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text + "\n")
    return text
