"""serving/ is the torch-free runtime: every module imports, and rnnlab-serve starts, with torch blocked.

import-linter (``make lint``) checks the import graph statically; this test checks it at run time, where a
lazy import inside a function or a plugin that pulls torch in would show up too.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

BLOCKER = """
import importlib.abc, pkgutil, sys

BLOCKED = ("torch", "lm", "seq2seq", "onnxscript", "matplotlib")


class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked import of {name} (serving/ must stay torch-free)")
        return None


sys.meta_path.insert(0, Block())
import serving

names = [m.name for m in pkgutil.walk_packages(serving.__path__, "serving.")]
for name in names:
    __import__(name)
print(len(names))
from serving.server import main

sys.argv = ["rnnlab-serve", "--help"]
main()
"""


def test_every_serving_module_imports_and_the_server_starts_with_torch_blocked():
    out = subprocess.run([sys.executable, "-c", BLOCKER], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    count, _, usage = out.stdout.partition("\n")
    assert int(count) >= 25  # every module of the package, not an empty walk
    assert "usage: rnnlab-serve" in usage and "--models" in usage
