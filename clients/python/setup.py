"""Builds arpcp-client: generates the gRPC stubs first, and requires the grpcio and
protobuf versions they were generated for (metadata lives in pyproject.toml)."""

import sys
from pathlib import Path

from setuptools import setup

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generate  # noqa: E402  (generate.py beside this file)

if (generate.DEFAULT_PROTO_ROOT / generate.PROTO).is_file():
    generate.generate()
elif not (generate.DEFAULT_OUT / "gateway_pb2.py").is_file():
    sys.exit(
        f"no {generate.PROTO} under {generate.DEFAULT_PROTO_ROOT} and no generated stubs: "
        "build from the arpcp repository (pip install ./clients/python)"
    )
protobuf, grpc = generate.generated_versions(generate.DEFAULT_OUT)
if not protobuf or not grpc:
    sys.exit(
        "the generated stubs do not say which protobuf and grpcio they need "
        "(grpcio-tools older than 1.66?): pip install -U grpcio-tools, then build again"
    )
major = int(protobuf.split(".")[0])
# protobuf refuses stubs from a newer major version; grpcio keeps compatibility within 1.x.
setup(install_requires=[f"grpcio>={grpc},<2", f"protobuf>={protobuf},<{major + 1}"])
