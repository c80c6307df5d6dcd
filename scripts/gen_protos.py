#!/usr/bin/env python3
"""Generate ``pipeline/pb/`` from every ``.proto`` under ``protos/``.

``--check`` regenerates into a temporary folder and exits 1 when the committed
code differs (a test runs it, so stale generated code fails the suite).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
PACKAGE = Path("pipeline") / "pb"


def generate(out_root: Path) -> list[Path]:
    """Run protoc (grpc_tools) over every proto; return the generated files relative to ``out_root``."""
    from grpc_tools import protoc

    sources = sorted(p.relative_to(PROTOS) for p in PROTOS.rglob("*.proto"))
    (out_root / PACKAGE).mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(s) for s in sources],
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {sources}")
    init = out_root / PACKAGE / "__init__.py"
    init.write_text('"""Generated protobuf code. Do not edit: run scripts/gen_protos.py."""\n')
    return sorted(p.relative_to(out_root) for p in (out_root / PACKAGE).rglob("*") if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if pipeline/pb is not up to date")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp))
        if args.check:
            stale = [
                str(f)
                for f in files
                if not (ROOT / f).is_file() or not filecmp.cmp(Path(tmp) / f, ROOT / f, shallow=False)
            ]
            committed = sorted(p.relative_to(ROOT) for p in (ROOT / PACKAGE).rglob("*") if p.is_file() and "__pycache__" not in p.parts)
            extra = [str(f) for f in committed if f not in files]
            if stale or extra:
                print(f"pipeline/pb is stale: differs {stale}, not generated {extra}; run scripts/gen_protos.py", file=sys.stderr)
                return 1
            return 0
        shutil.rmtree(ROOT / PACKAGE, ignore_errors=True)
        shutil.copytree(Path(tmp) / PACKAGE, ROOT / PACKAGE)
        print(f"generated {len(files)} files into {PACKAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
