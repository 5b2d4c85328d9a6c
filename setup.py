"""Build step that compiles every .proto under proto/ into the gmesh package.

Generated code is built, never committed: a wheel gets it in its build directory, an
editable install (`pip install -e .`) gets it next to the sources (git-ignored).
"""

from __future__ import annotations

import pathlib

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = pathlib.Path(__file__).resolve().parent
PROTO_ROOT = ROOT / "proto"


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        # Sources first: generating first would leave empty __init__.py files that look
        # newer than the real ones, and build_py would then not copy the real ones.
        super().run()
        import grpc_tools
        from grpc_tools import protoc

        protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
        out = ROOT if self.editable_mode else pathlib.Path(self.build_lib)
        out.mkdir(parents=True, exist_ok=True)
        well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *protos,
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {protos}")
        # Directories holding only generated modules need to be packages too.
        for proto in protos:
            pkg = (out / proto).parent
            while pkg != out and not (pkg / "__init__.py").exists():
                (pkg / "__init__.py").touch()
                pkg = pkg.parent


setup(cmdclass={"build_py": BuildPyWithProtos})
