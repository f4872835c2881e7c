"""The checked-in gRPC stubs are what scripts/generate-grpc-stubs makes of grpc_service.proto."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

PROTO = ROOT / "app" / "grpc" / "proto"
STUBS = (
    "grpc_service_pb2.py",
    "grpc_service_pb2.pyi",
    "grpc_service_pb2_grpc.py",
    "grpc_service_pb2_grpc.pyi",
)


def test_stubs_match_the_proto(tmp_path: Path) -> None:
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpcio-tools (the `test` extra) is not installed")
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "generate-grpc-stubs"), str(tmp_path)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        env={"PYTHON": sys.executable, "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"},
    )
    for name in STUBS:
        made = (tmp_path / "app" / "grpc" / "proto" / name).read_text()
        assert made == (PROTO / name).read_text(), (
            f"{name} differs: run scripts/generate-grpc-stubs"
        )


def test_stubs_load_beside_another_copy_of_the_protocol() -> None:
    # tritonclient's stubs define the same `inference.*` names in protobuf's default pool.
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient (the `test` extra) is not installed")
    script = (
        "import tritonclient.grpc.service_pb2 as theirs\n"
        "from app.grpc.proto import grpc_service_pb2 as ours\n"
        "m = ours.ModelInferRequest(model_name='m', raw_input_contents=[b'x'])\n"
        "t = theirs.ModelInferRequest.FromString(m.SerializeToString())\n"
        "assert (t.model_name, list(t.raw_input_contents)) == ('m', [b'x'])\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True)
