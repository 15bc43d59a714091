"""Run the benchmarks one after another; each writes bench/results/<name>.json.

``python -m bench.run_all`` runs the quick set; ``--all`` adds the long training runs
(tiny Shakespeare in 20 minutes, the default translator in under an hour).
"""

from __future__ import annotations

import argparse
import subprocess
import sys

QUICK = [
    "lm_throughput",
    "lm_partition",
    "ddp",
    "export_step",
    "export_int8",
    "serve_load",
    "mt_decode",
    "mt_serve",
]
LONG = ["lm_default", "lm_shakespeare", "mt_train"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--all", action="store_true", help="also run the long training benchmarks")
    parser.add_argument("names", nargs="*", help="run only these benchmarks")
    args = parser.parse_args(argv)
    names = args.names or (QUICK + LONG if args.all else QUICK)
    failed = []
    for name in names:
        print(f"== bench.{name}", file=sys.stderr, flush=True)
        if subprocess.call([sys.executable, "-m", f"bench.{name}"]) != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
