#!/usr/bin/env python3
"""Generates the gRPC stubs of the arpcp gateway for the Python client.

Compiles ``proto/arpcp/v1/gateway.proto`` (at the repository's root) with
``grpcio-tools`` -- no system ``protoc`` needed -- into
``arpcp_client/_generated/`` (``gateway_pb2.py``, ``gateway_pb2.pyi``,
``gateway_pb2_grpc.py``), and makes the stubs import each other relatively, so
they live inside the package rather than as a top-level ``arpcp`` module.

Usage: ``python clients/python/generate.py [--proto-root DIR] [--out DIR]``.
``pip install ./clients/python`` runs it too (see ``setup.py``).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = "arpcp/v1/gateway.proto"
DEFAULT_PROTO_ROOT = HERE.parent.parent / "proto"
DEFAULT_OUT = HERE / "arpcp_client" / "_generated"


def generated_versions(out: Path) -> tuple[str, str]:
    """The protobuf and grpcio versions the stubs in ``out`` need at run time."""
    pb2 = (out / "gateway_pb2.py").read_text()
    m = re.search(
        r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),",
        pb2,
    )
    protobuf = ".".join(m.groups()) if m else ""
    grpc = (out / "gateway_pb2_grpc.py").read_text()
    m = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", grpc)
    return protobuf, (m.group(1) if m else "")


def generate(proto_root: Path = DEFAULT_PROTO_ROOT, out: Path = DEFAULT_OUT) -> Path:
    """Writes the stubs into ``out``; returns ``out``."""
    try:
        from grpc_tools import protoc
    except ImportError:
        sys.exit("generate.py needs grpcio-tools: pip install grpcio-tools")
    import grpc_tools

    source = proto_root / PROTO
    if not source.is_file():
        sys.exit(f"generate.py: {source} not found (use --proto-root)")
    # The well-known types (struct, duration, timestamp) ship with grpcio-tools.
    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{proto_root}",
                f"-I{well_known}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                PROTO,
            ]
        )
        if code != 0:
            sys.exit(f"generate.py: protoc failed with exit code {code}")
        built = Path(tmp) / "arpcp" / "v1"
        out.mkdir(parents=True, exist_ok=True)
        for name in ("gateway_pb2.py", "gateway_pb2.pyi", "gateway_pb2_grpc.py"):
            text = (built / name).read_text()
            # protoc writes `from arpcp.v1 import gateway_pb2`; the stubs live in
            # arpcp_client._generated, so import the sibling module relatively.
            text = text.replace("from arpcp.v1 import gateway_pb2", "from . import gateway_pb2")
            (out / name).write_text(text)
        init = out / "__init__.py"
        init.write_text('"""gRPC stubs generated from proto/arpcp/v1/gateway.proto by generate.py."""\n')
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--proto-root", type=Path, default=DEFAULT_PROTO_ROOT)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args()
    out = generate(a.proto_root, a.out)
    protobuf, grpc = generated_versions(out)
    print(f"generated {out} (needs protobuf>={protobuf}, grpcio>={grpc})")


if __name__ == "__main__":
    main()
