"""Regenerates the small committed bundles in tests/bundles/ that the serving tests run on.

    python scripts/make_test_bundles.py            # rewrite tests/bundles/
    python scripts/make_test_bundles.py --check    # regenerate into a temporary folder and compare

The bundles are made by the same code the test suite uses for its tiny models (tests/tiny_bundles.py,
tests/tiny_translators.py): seeded, on one thread, from a fixed text and the first 1200 pairs of the
registered fra-eng data set. The serving tests load them as they are, so they run where torch is not
installed (``make test-serve``). ``--check`` exits 1 when a bundle differs from what the script makes now
in anything but the measured parity numbers, the tool versions and the graphs' weights within 1e-3
(training is seeded, but float rounding may differ between CPUs); see docs/export.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.committed_bundles import BUNDLES_DIR, compare_bundle_dirs, make_test_bundles  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="compare the committed bundles with freshly made ones instead of rewriting them")
    parser.add_argument("--out", type=Path, default=BUNDLES_DIR, help="folder of the bundles (tests/bundles)")
    args = parser.parse_args(argv)
    if not args.check:
        make_test_bundles(args.out)
        print(f"wrote {', '.join(sorted(p.name for p in args.out.iterdir() if p.is_dir()))} in {args.out}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        make_test_bundles(Path(tmp))
        problems = compare_bundle_dirs(args.out, Path(tmp))
    for problem in problems:
        print(problem, file=sys.stderr)
    print("committed bundles match the script" if not problems else
          f"{len(problems)} difference(s): run `python scripts/make_test_bundles.py`, commit tests/bundles/")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
