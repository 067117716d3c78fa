"""File names as text: what stdout, files and stderr show of a path, always valid UTF-8 (shared by output.py and
render.py, so neither imports the other for it)."""

from __future__ import annotations

import os
from pathlib import Path


def display(path: Path | str) -> str:
    """A file name as valid UTF-8 text: bytes that are not UTF-8 (kept by Python as surrogate escapes) become
    U+FFFD, so JSON, CSV and the terminal always get valid text."""
    return os.fsencode(path).decode("utf-8", "replace")
