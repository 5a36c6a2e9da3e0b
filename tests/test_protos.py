"""The generated protobuf modules match protos/."""

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def generated_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*_pb2*") if p.suffix in (".py", ".pyi") and "__pycache__" not in p.parts]


def test_generated_code_is_current(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)], check=True)
    fresh = sorted(p.relative_to(tmp_path) for p in generated_files(tmp_path))
    committed = sorted(p.relative_to(ROOT) for p in generated_files(ROOT / "tenantserve"))

    assert fresh == committed, "run scripts/gen_protos.py: the set of generated files changed"
    stale = [str(p) for p in fresh if not filecmp.cmp(tmp_path / p, ROOT / p, shallow=False)]
    assert stale == [], f"run scripts/gen_protos.py: stale generated files {stale}"


def test_every_proto_field_is_commented() -> None:
    uncommented = []
    for proto in (ROOT / "protos").rglob("*.proto"):
        lines = proto.read_text().splitlines()
        for number, line in enumerate(lines):
            stripped = line.strip()
            is_field = stripped.endswith(";") and "=" in stripped and not stripped.startswith(("option", "syntax"))
            is_enum_zero = stripped.split("=")[0].strip().endswith("_UNSPECIFIED")
            if is_field and not is_enum_zero and not lines[number - 1].strip().startswith("//"):
                uncommented.append(f"{proto.name}:{number + 1}: {stripped}")
    assert uncommented == []
