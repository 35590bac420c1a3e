"""Regenerates the Python bindings and mypy stubs from the `.proto` sources.

Run as `python leyline/run_codegen.py` (a script: it must work while the package's
imports are stale) after editing a `.proto` file; the drift test
(`tests/leyline/test_codegen_drift.py`) runs the same function into a temporary
directory and fails when the committed files differ. Never edit the generated
`*_pb2*.py(i)` files by hand.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROTO_ROOT = PACKAGE_DIR.parent  # imports read "leyline/v1/<file>.proto"
PROTO_DIR = PACKAGE_DIR / "v1"
SERVICE_PROTOS = ("sidecar.proto",)


class CodegenError(RuntimeError):
    """protoc refused the sources or a plugin is missing."""


def proto_sources() -> list[Path]:
    """The `.proto` files, sorted so output is deterministic."""
    return sorted(PROTO_DIR.glob("*.proto"))


def _protoc(args: list[str]) -> None:
    import grpc_tools  # type: ignore[import-untyped]  # dev-only, imported lazily
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    argv = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", *args]
    if protoc.main(argv) != 0:
        raise CodegenError(f"protoc failed: {' '.join(argv)}")


def generate(out_root: Path) -> list[Path]:
    """Writes generated files for every source under `out_root/leyline/v1`.

    Returns the generated paths relative to `out_root`. Requires
    `protoc-gen-mypy` (mypy-protobuf) on PATH; the venv's `bin` is prepended.
    """
    import os

    bin_dir = Path(sys.executable).parent
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    if shutil.which("protoc-gen-mypy") is None:
        raise CodegenError("protoc-gen-mypy not found: pip install mypy-protobuf")
    sources = [str(p.relative_to(PROTO_ROOT)) for p in proto_sources()]
    services = [s for s in sources if Path(s).name in SERVICE_PROTOS]
    out_root.mkdir(parents=True, exist_ok=True)
    _protoc([f"--python_out={out_root}", f"--mypy_out={out_root}", *sources])
    _protoc([f"--grpc_python_out={out_root}", f"--mypy_grpc_out={out_root}", *services])
    generated = sorted(
        p.relative_to(out_root)
        for p in (out_root / "leyline" / "v1").iterdir()
        if p.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi"))
    )
    return generated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if committed files drift")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        generated = generate(out)
        drift = []
        for rel in generated:
            target = PROTO_ROOT / rel
            fresh = (out / rel).read_bytes()
            if not target.exists() or target.read_bytes() != fresh:
                drift.append(str(rel))
                if not args.check:
                    target.write_bytes(fresh)
    if args.check and drift:
        print("generated Leyline code drifted from the .proto sources:", *drift, sep="\n  ")
        print("run: python leyline/run_codegen.py")
        return 1
    print(f"{len(generated)} generated files {'checked' if args.check else 'up to date'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
