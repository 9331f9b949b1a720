"""Generate the Python gRPC code in ``pfsync/v1/`` from ``proto/pfsync/v1/*.proto``.

One implementation, three callers:

- ``setup.py`` runs it from ``build_py`` (so ``pip install`` and ``pip install -e`` produce
  the modules);
- ``tests/test_proto.py`` runs it into a temporary directory to catch stale generated files;
- people run it by hand: ``python -m pfsync._protogen [--out DIR]``.

``setup.py`` loads this file by path before the package is installed, so it must import
nothing but the standard library and ``grpc_tools`` (a build requirement).
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

#: Repository root: protoc's output root, so ``pfsync/v1/x.proto`` lands in ``pfsync/v1/``.
REPO_ROOT = Path(__file__).resolve().parent.parent
#: Import root of the .proto files (``-I proto``).
PROTO_ROOT = REPO_ROOT / "proto"
#: Package whose .proto files are compiled, relative to both roots.
PACKAGE_DIR = Path("pfsync") / "v1"
#: What protoc writes for ``x.proto``: ``x`` + each suffix.
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")
#: One FileDescriptorSet of every package .proto and its imports, *with* source info
#: (comments). The ``_pb2`` modules embed descriptors stripped of comments; server
#: reflection serves this set instead, so clients discovering the API see its docs.
DESCRIPTOR_SET = "descriptors.binpb"


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Return the .proto files of the package, sorted so output order is stable."""
    return sorted((proto_root / PACKAGE_DIR).glob("*.proto"))


def generated_files(directory: Path) -> list[Path]:
    """Return the generated files present in ``directory``, sorted by name."""
    return sorted(
        path
        for path in directory.iterdir()
        if path.name.endswith(GENERATED_SUFFIXES) or path.name == DESCRIPTOR_SET
    )


def generate(out_root: Path = REPO_ROOT, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Compile every package .proto into ``out_root/pfsync/v1/`` and return the files written.

    Generated files already there are removed first, so a deleted .proto leaves no orphan
    module behind. Raises ``RuntimeError`` when there is nothing to compile or protoc fails
    (protoc has then printed its diagnostics on stderr).
    """
    sources = proto_files(proto_root)
    if not sources:
        raise RuntimeError(f"no .proto files in {proto_root / PACKAGE_DIR}")
    out_dir = out_root / PACKAGE_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in generated_files(out_dir):
        stale.unlink()
    # grpc_tools ships google/protobuf/*.proto; listing it lets protos import well-known types.
    well_known = resources.files("grpc_tools") / "_proto"
    argv = [
        "grpc_tools.protoc",
        f"--proto_path={proto_root}",
        f"--proto_path={well_known}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--descriptor_set_out={out_dir / DESCRIPTOR_SET}",
        "--include_imports",
        "--include_source_info",
        *(str(source) for source in sources),
    ]
    status = protoc.main(argv)
    if status != 0:
        raise RuntimeError(f"protoc failed (exit status {status})")
    return generated_files(out_dir)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: regenerate the modules and list them."""
    parser = argparse.ArgumentParser(
        prog="python -m pfsync._protogen",
        description="Generate pfsync/v1/*_pb2*.py from proto/pfsync/v1/*.proto.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT,
        help="output root; files go to OUT/pfsync/v1/ (default: the repository root)",
    )
    args = parser.parse_args(argv)
    try:
        written = generate(args.out)
    except RuntimeError as exc:
        print(f"protogen: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
