"""Run every ``bench/bench_*.py`` module (or those named on the command line) and collect results.

Each module exposes ``run() -> list[dict]``; every result is printed as one JSON line and written to
``bench/results/<name>.json``.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def main(argv: list[str]) -> int:
    known = sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))
    unknown = [name for name in argv if name not in known]
    if unknown:
        print(f"no benchmark {', '.join(unknown)}; the benchmarks are {', '.join(known)}", file=sys.stderr)
        return 2
    names = argv or known
    RESULTS.mkdir(parents=True, exist_ok=True)
    failed = 0
    for name in names:
        module = importlib.import_module(f"bench.bench_{name}")
        started = time.time()
        try:
            results: list[dict[str, object]] = module.run()
        except Exception as exc:
            print(json.dumps({"benchmark": name, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
            failed += 1
            continue
        for result in results:
            print(json.dumps(result), flush=True)
        payload = {"area": name, "seconds": round(time.time() - started, 2), "results": results}
        (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
