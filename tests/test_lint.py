"""The whole tree stays clean under pyflakes: no unused imports or names."""

from __future__ import annotations

import io
from pathlib import Path

from pyflakes.api import checkRecursive
from pyflakes.reporter import Reporter

ROOT = Path(__file__).resolve().parent.parent


def test_the_tree_is_clean_under_pyflakes():
    """Unused imports hide what a module depends on (stop 12's faultlib)."""
    out, err = io.StringIO(), io.StringIO()
    paths = [str(ROOT / name) for name in ("pullmail", "tests", "bench", "twisted")]
    count = checkRecursive(paths, Reporter(out, err))
    assert (count, out.getvalue(), err.getvalue()) == (0, "", "")
