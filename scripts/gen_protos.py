"""Generate Python code, gRPC stubs and type stubs from protos/ into src/mesh/.

Run by `make proto`. Output directories are wiped first so a removed proto leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
THIRD_PARTY = ROOT / "third_party" / "protos"
OUT = ROOT / "src"


def main() -> int:
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    packages = {Path(s).parts[1] for s in sources}
    for package in packages:
        shutil.rmtree(OUT / "mesh" / package, ignore_errors=True)
    # protoc finds the mypy plugins (protoc-gen-mypy*) on PATH, next to this interpreter.
    bin_dir = str(Path(sys.executable).parent)
    os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    well_known = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{THIRD_PARTY}",
        f"-I{well_known}",
        f"--python_out={OUT}",
        f"--grpc_python_out={OUT}",
        f"--mypy_out={OUT}",
        f"--mypy_grpc_out={OUT}",
        *sources,
    ]
    code = protoc.main(args)
    if code != 0:
        print(f"protoc failed with exit code {code}", file=sys.stderr)
        return int(code)
    for package in packages:
        for directory in [OUT / "mesh" / package, *(OUT / "mesh" / package).rglob("*")]:
            if directory.is_dir():
                (directory / "__init__.py").touch()
    print(f"generated {len(sources)} protos into {OUT / 'mesh'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
