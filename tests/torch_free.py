"""Python code in a subprocess with the training stack blocked: what the serving install
(``pip install '.[serve]'``, no torch) sees, checked in the full install too.

A meta-path finder refuses the blocked top-level packages, so a lazy import inside a function shows up as
well as a module-level one (import-linter, ``make lint``, checks the static import graph).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from serving.errors import TRAINING_ONLY

ROOT = Path(__file__).resolve().parents[1]

_BLOCKER = """
import importlib.abc, sys

BLOCKED = {blocked!r}


class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
        return None


sys.meta_path.insert(0, Block())
"""


def run_blocked(code: str, blocked: Sequence[str] = TRAINING_ONLY) -> subprocess.CompletedProcess:
    """Runs ``code`` with ``blocked`` (top-level package names) refused, in the repository's root."""
    program = _BLOCKER.format(blocked=tuple(blocked)) + code
    return subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True)


def run_cli_blocked(
    module: str, argv: Sequence[str], blocked: Sequence[str] = TRAINING_ONLY
) -> subprocess.CompletedProcess:
    """``module``'s ``main(argv)`` (a CLI: its exit code is the process's) with ``blocked`` refused."""
    code = f"from {module} import main\nsys.exit(main({list(argv)!r}))\n"
    return run_blocked(code, blocked)
