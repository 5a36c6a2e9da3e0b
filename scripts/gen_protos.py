"""Generate the Python protobuf and gRPC modules from protos/.

Run from anywhere: ``python scripts/gen_protos.py``. The output goes to
``tenantserve/v1/`` at the repository root (the proto package is
``tenantserve.v1``); ``--out DIR`` writes it elsewhere, which the staleness
test uses to compare a fresh generation with the committed files.
"""

import argparse
import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.rglob("*.proto"))


def generate(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p.relative_to(PROTO_DIR)) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the messages above")
    for package_dir in {p.parent for p in out_dir.rglob("*_pb2.py")}:
        (package_dir / "__init__.py").touch()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: repository root)")
    generate(parser.parse_args().out)


if __name__ == "__main__":
    sys.exit(main())
