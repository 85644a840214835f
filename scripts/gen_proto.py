"""Generate (or check) the committed Python stubs of ``proto/specfleet.proto``.

Usage: ``python scripts/gen_proto.py`` rewrites ``proto/specfleet_pb2.py``,
``specfleet_pb2_grpc.py`` and ``specfleet_pb2.pyi``; ``--check`` regenerates them
into a temporary directory and exits 1 if the committed files differ (the test
``tests/unit/test_proto_stubs.py`` runs this). Needs the grpcio-tools version
pinned in pyproject's ``dev`` extra: another version writes other version strings.

Why the copy into ``specfleet/proto/``: protoc names imports after the path of the
.proto file under its include root, and the package is installed as
``specfleet.proto`` (a top-level ``proto`` would be shadowed by proto-plus). Compiling
it as ``specfleet/proto/specfleet.proto`` makes the generated grpc module import
``from specfleet.proto import specfleet_pb2``, which works in every install mode.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTO_DIR = REPO / "proto"
PROTO = "specfleet.proto"
GENERATED = ("specfleet_pb2.py", "specfleet_pb2_grpc.py", "specfleet_pb2.pyi")
PINNED_TOOLS = "1.85.1"  # keep equal to grpcio-tools in pyproject's dev extra


def generate(out_dir: Path) -> None:
    """Compile the .proto and write the generated files straight into ``out_dir``."""
    import grpc_tools
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "src"
        package = root / "specfleet" / "proto"
        package.mkdir(parents=True)
        shutil.copyfile(PROTO_DIR / PROTO, package / PROTO)
        build = Path(tmp) / "out"
        build.mkdir()
        well_known = Path(grpc_tools.__file__).parent / "_proto"
        rc = protoc.main([
            "grpc_tools.protoc",
            f"-I{root}",
            f"-I{well_known}",
            f"--python_out={build}",
            f"--pyi_out={build}",
            f"--grpc_python_out={build}",
            f"specfleet/proto/{PROTO}",
        ])
        if rc != 0:
            raise SystemExit(f"protoc failed with exit code {rc}")
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in GENERATED:
            shutil.copyfile(build / "specfleet" / "proto" / name, out_dir / name)


def tools_version() -> str:
    from importlib.metadata import version

    return version("grpcio-tools")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if stale")
    args = parser.parse_args(argv)
    if tools_version() != PINNED_TOOLS:
        print(f"warning: grpcio-tools {tools_version()} is not the pinned {PINNED_TOOLS}; "
              "the output will differ in version strings", file=sys.stderr)
    if not args.check:
        generate(PROTO_DIR)
        print(f"wrote {', '.join(GENERATED)} to {PROTO_DIR}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [n for n in GENERATED
                 if not (PROTO_DIR / n).exists() or not filecmp.cmp(Path(tmp) / n, PROTO_DIR / n, shallow=False)]
    if stale:
        print(f"stale generated stubs: {', '.join(stale)}; run `make proto`", file=sys.stderr)
        return 1
    print("generated stubs are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
