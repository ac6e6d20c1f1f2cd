"""python -m abqueue.reference [--check] [--out docs/reference]"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from abqueue.reference import render


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m abqueue.reference", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("docs/reference"))
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a page differs from the code")
    args = p.parse_args(argv)
    stale = []
    for name, text in render().items():
        path = args.out / name
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(path)
    for path in stale:
        print(f"out of date: {path}; run `python -m abqueue.reference`", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
