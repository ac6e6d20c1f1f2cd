"""What `abq batch` keeps per input line: its first pass's fingerprints (the duplicate check) and the
done set (lines already in the output), measured with tracemalloc on a synthetic file of 570-byte
lines; and what streaming the lines themselves holds (nothing per line). No broker needed.

Run:  python bench/batch_memory.py [--lines 200000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from producers.batch import _item, _lines, scan_input
from schemas import ExperimentConfig


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=200_000)
    args = ap.parse_args()
    exp = ExperimentConfig(name="mem", variants=[{"name": "a", "weight": 100}])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "in.jsonl"
        with path.open("wb") as f:
            for i in range(args.lines):
                f.write(orjson.dumps({"id": f"req-{i:09d}", "prompt": "x" * 530, "max_tokens": 64}) + b"\n")
        line_bytes = path.stat().st_size / args.lines
        tracemalloc.start()
        t0 = time.monotonic()
        scan = scan_input(path)
        done = set(scan.fingerprints)  # the done set at its largest: every line already has a result
        both = tracemalloc.get_traced_memory()[0]
        scan.fingerprints.clear()
        kept = tracemalloc.get_traced_memory()[0]
        scanned = time.monotonic() - t0
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        for n, raw in _lines(path):
            _item(n, raw, exp, False)
        streaming = tracemalloc.get_traced_memory()[1] - base
        del done
    n = args.lines
    print(f"{n} lines of {line_bytes:.0f} bytes: first pass {scanned:.1f}s")
    print(f"  while the first pass's set and the done set coexist: {both / n:.0f} bytes per line")
    print(f"  for the rest of the run (the done set): {kept / n:.0f} bytes per line")
    print(f"  streaming and parsing every line: {streaming / 1e3:.0f} KB in all, whatever the line count")
    print(f"rerun: python bench/batch_memory.py --lines {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
