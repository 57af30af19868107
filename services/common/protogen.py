"""Generates the Python stubs for protos/ into services/common/pb/ (`make proto`).

protoc writes imports rooted at the proto package (`from loraplex.common.v1 import ...`).
We rewrite them to `services.common.pb.loraplex...` so the stubs live inside our package
and nothing has to be added to sys.path. The stubs are committed; tests/common/
test_protos.py regenerates into a temporary folder and fails when they differ.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "protos"
STUB_ROOT = REPO_ROOT / "services" / "common" / "pb"
STUB_PACKAGE = "services.common.pb"

_IMPORT = re.compile(r"^(from|import) loraplex\.", re.MULTILINE)


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path = STUB_ROOT) -> list[Path]:
    """Runs protoc (grpcio-tools) into out_dir and returns the files written."""
    from grpc_tools import protoc  # build-time dependency only

    include = Path(protoc.__file__).parent / "_proto"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p.relative_to(PROTO_ROOT)) for p in proto_files()],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed; see the messages above")
    written = []
    for path in sorted(out_dir.rglob("*.py*")):
        text = _IMPORT.sub(lambda m: f"{m.group(1)} {STUB_PACKAGE}.loraplex.", path.read_text())
        path.write_text(text)
        written.append(path)
    for folder in [out_dir, *[p for p in out_dir.rglob("*") if p.is_dir()]]:
        init = folder / "__init__.py"
        if not init.exists():
            init.write_text("")
            written.append(init)
    return sorted(written)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=STUB_ROOT, help="output folder")
    args = parser.parse_args(argv)
    files = generate(args.out)
    print(f"wrote {len(files)} files under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
