"""The API contract's generated stubs are current, and the SDK stays light.

The stubs are committed (users of the SDK need no protoc); this regenerates them
with the pinned grpcio-tools into a temporary directory and fails if the committed
files differ, i.e. if someone edited ``specfleet.proto`` without ``make proto``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_committed_stubs_match_the_proto():
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the dev extra) is not installed")
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "gen_proto.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr + out.stdout


def test_grpc_stub_imports_messages_through_the_package():
    # `import specfleet_pb2` (protoc's default) would only work with proto/ on sys.path.
    text = (REPO / "proto" / "specfleet_pb2_grpc.py").read_text()
    assert "from specfleet.proto import specfleet_pb2" in text


def test_sdk_imports_without_torch_ray_or_transformers():
    code = (
        "import sys\n"
        "from specfleet.client import Client, AsyncClient, SpecFleetError\n"
        "import specfleet.proto.client, specfleet.router.cli_generate\n"
        "heavy = sorted(m for m in ('torch', 'ray', 'transformers', 'numpy', 'tokenizers')"
        " if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"the SDK imported {out.stdout.strip()}"


def test_service_descriptor():
    from specfleet.proto import specfleet_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["SpecFleet"]
    assert service.full_name == "specfleet.v1.SpecFleet"
    methods = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert methods == {"Generate": (False, False), "GenerateStream": (False, True),
                       "Info": (False, False)}
    assert [f.name for f in pb.GenerateRequest.DESCRIPTOR.oneofs_by_name["prompt"].fields] == [
        "text", "token_ids", "chat"]
