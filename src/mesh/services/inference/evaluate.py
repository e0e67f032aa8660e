"""``make eval``: the strip reader's accuracy and latency on the held-out generated split, as one JSON object.

Usage: ``python -m mesh.services.inference.evaluate [--count N] [--split heldout|train] [--no-timing]
[--show-errors] [--lossless]``.
"""

from __future__ import annotations

import argparse
import json
import sys

from mesh.kit.cli import positive_int
from mesh.services.inference.strip.evaluate import evaluate


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=positive_int, default=400, help="images to generate and read")
    parser.add_argument("--split", choices=["heldout", "train"], default="heldout")
    parser.add_argument("--no-timing", action="store_true", help="skip the latency measurements")
    parser.add_argument("--show-errors", action="store_true", help="keep the list of misread seeds")
    parser.add_argument(
        "--lossless",
        action="store_true",
        help="read the same scenes saved as PNG, to see what JPEG costs (not the figures the targets judge)",
    )
    args = parser.parse_args(argv)
    result = evaluate(args.split, args.count, timing=not args.no_timing, lossless=args.lossless)
    if not args.show_errors:
        result["errors"] = len(result["errors"])
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
