"""Regenerate the Python modules from the .proto sources: ``python -m proto``.

``python -m proto --check`` exits 1 if the committed modules are stale.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

PROTO_DIR = Path(__file__).resolve().parent
ROOT = PROTO_DIR.parent
OUTPUT_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def sources() -> list[Path]:
    return sorted(PROTO_DIR.glob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on every source, writing ``proto/*_pb2*.py`` under ``out_dir``."""
    include = Path(protoc.__file__).resolve().parent / "_proto"
    outputs: list[Path] = []
    for src in sources():
        rel = src.relative_to(ROOT).as_posix()
        args = [
            "grpc_tools.protoc",
            f"-I{ROOT}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            rel,
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {rel}")
        stem = src.stem
        outputs += [out_dir / "proto" / f"{stem}{suffix}" for suffix in OUTPUT_SUFFIXES]
    return outputs


def stale_modules() -> list[str]:
    """Names of generated modules that differ from what the sources produce now."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = []
        for path in fresh:
            committed = PROTO_DIR / path.name
            if not committed.exists() or committed.read_bytes() != path.read_bytes():
                stale.append(path.name)
        return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proto", description=__doc__)
    parser.add_argument("--check", action="store_true", help="only report stale modules")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_modules()
        if stale:
            print("stale generated modules: " + ", ".join(stale), file=sys.stderr)
            print("run: python -m proto", file=sys.stderr)
            return 1
        return 0
    generate(ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
