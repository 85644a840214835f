"""A scripted ``GenerationBackend`` and a byte tokenizer: the frontends without a model.

Where it sits: the API failure tests (``tests/integration/test_grpc_faults.py``,
``test_http_faults.py``) serve these behind the real servers, to provoke on demand
what a real engine makes slow or flaky: overload, backend failures and crashes, hung
requests, cancels; plus a throw-away self-signed certificate for TLS.
"""

from __future__ import annotations

import asyncio
import datetime
import threading
from collections import Counter

from specfleet.core.serving import (
    BackendInfo,
    ChunkError,
    DrafterInfo,
    ErrorCode,
    GenerationChunk,
    GenerationRequest,
    VerifierGroupInfo,
)
from specfleet.core.stats import RequestStats
from specfleet.core.types import FinishReason

EOS = 256
REPLY = "héllo wörld → ünïcode ✓ done. STOP here"


class ByteTokenizer:
    """One token per UTF-8 byte, plus EOS (256)."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        out = bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        return out if skip_special_tokens or EOS not in ids else out + "<eos>"


class ScriptedBackend:
    """Replies with ``REPLY`` in chunks of 3 tokens; the prompt picks other behaviour:
    ``hang`` never finishes, ``flood`` streams forever, ``fail`` reports an error chunk, ``crash`` raises,
    ``slow`` waits on ``release`` first (for overload tests), ``late-fail`` streams a few
    tokens, then reports an error chunk."""

    def __init__(self):
        self.active: set[str] = set()
        self.release = threading.Event()
        self.started = 0

    def info(self) -> BackendInfo:
        return BackendInfo("scripted", "bytes", 257, 256,
                           drafters=[DrafterInfo("d1", "ngram", "general")],
                           verifier_groups=[VerifierGroupInfo(0, 1, "cpu", "float32")])

    def active_request_ids(self) -> list[str]:
        return sorted(self.active)

    async def close(self) -> None:
        pass

    async def stream(self, request: GenerationRequest):
        prompt = bytes(request.prompt_token_ids).decode()
        self.active.add(request.request_id)
        self.started += 1
        try:
            if prompt == "hang":
                await asyncio.Event().wait()
            if prompt == "flood":  # endless output, never waiting: the handler mostly sits
                while True:        # in gRPC's send, not in our await, when cancelled
                    yield GenerationChunk(request.request_id, list(b"spam "))
                    await asyncio.sleep(0)
            if prompt == "slow":
                while not self.release.is_set():
                    await asyncio.sleep(0.01)
            if prompt == "late-fail":
                yield GenerationChunk(request.request_id, list(b"par"))
                await asyncio.sleep(0)
                yield GenerationChunk(request.request_id, [], error=ChunkError(ErrorCode.INTERNAL, "verifier lost"))
                return
            if prompt == "fail":
                yield GenerationChunk(request.request_id, [], error=ChunkError(ErrorCode.INTERNAL, "verifier lost"))
                return
            if prompt == "crash":
                raise RuntimeError("backend bug")
            tokens = list(REPLY.encode()) + [EOS]
            sampling = request.sampling
            out, reason = [], FinishReason.EOS
            for tok in tokens:  # the engine's stop rule: cut after the completing token
                out.append(tok)
                text = ByteTokenizer().decode(out, skip_special_tokens=True)
                if any(s in text for s in sampling.stop):
                    reason = FinishReason.STOP
                    break
                if len(out) >= sampling.max_new_tokens:
                    reason = FinishReason.LENGTH
                    break
            for i in range(0, len(out), 3):
                yield GenerationChunk(request.request_id, out[i : i + 3])
                await asyncio.sleep(0)
            stats = RequestStats(rounds=3, drafted=6, accepted=4, emitted=7, drafters=Counter(d1=3))
            yield GenerationChunk(request.request_id, [], reason, stats)
        finally:
            self.active.discard(request.request_id)


def self_signed(tmp_path):
    """A self-signed certificate for localhost/127.0.0.1: (cert path, key path)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    import ipaddress

    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path
