#!/usr/bin/env python3
"""Generates the gRPC stubs of the arpcp gateway for the Python client.

Compiles ``proto/arpcp/v1/gateway.proto`` (at the repository's root) with
``grpcio-tools`` -- no system ``protoc`` needed -- into
``arpcp_client/_generated/`` (``gateway_pb2.py``, ``gateway_pb2.pyi``,
``gateway_pb2_grpc.py``), and makes the stubs import each other relatively, so
they live inside the package rather than as a top-level ``arpcp`` module.

protoc writes no type stub for ``gateway_pb2_grpc.py``, so this script writes
``gateway_pb2_grpc.pyi`` from the service's descriptor: the client stub's methods
typed by request and response, for ``grpc`` and ``grpc.aio`` channels, which is what
lets ``mypy --strict`` check the client (and code using it) without ``Any``.

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
                f"--descriptor_set_out={Path(tmp) / 'gateway.desc'}",
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
        (out / "gateway_pb2_grpc.pyi").write_text(_grpc_stub((Path(tmp) / "gateway.desc").read_bytes()))
        init = out / "__init__.py"
        init.write_text('"""gRPC stubs generated from proto/arpcp/v1/gateway.proto by generate.py."""\n')
    return out


def _grpc_stub(descriptor_set: bytes) -> str:
    """The text of ``gateway_pb2_grpc.pyi``: the client stub of each service."""
    from google.protobuf import descriptor_pb2

    fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set)
    (proto,) = [f for f in fds.file if f.name == PROTO]
    package = "." + proto.package + "."
    lines = [
        '"""Types of the client stubs in gateway_pb2_grpc.py (written by generate.py).',
        "",
        "``<Service>AsyncStub`` exists only here: it is what ``<Service>Stub`` is on a",
        '``grpc.aio`` channel."""',
        "",
        "from typing import Union",
        "",
        "import grpc",
        "import grpc.aio",
        "",
        "from . import gateway_pb2",
    ]

    def message(name: str) -> str:
        if not name.startswith(package):
            raise SystemExit(f"generate.py: {name} is not a message of {proto.package}")
        return "gateway_pb2." + name[len(package):]

    for service in proto.service:
        for flavour, module in (("", "grpc"), ("Async", "grpc.aio")):
            lines += ["", "", f"class {service.name}{flavour}Stub:"]
            if not flavour:
                lines.append("    def __init__(self, channel: Union[grpc.Channel, grpc.aio.Channel]) -> None: ...")
            for m in service.method:
                kind = ("Stream" if m.client_streaming else "Unary") + (
                    "Stream" if m.server_streaming else "Unary"
                )
                lines.append(
                    f"    {m.name}: {module}.{kind}MultiCallable"
                    f"[{message(m.input_type)}, {message(m.output_type)}]"
                )
    return "\n".join(lines) + "\n"


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
