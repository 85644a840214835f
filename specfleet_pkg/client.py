"""``specfleet.client``: the Python client SDK (defined in ``specfleet.proto.client``).

Imports only grpc and the generated stubs — never torch, Ray or transformers.
"""

from specfleet.proto.client import (
    AsyncClient,
    Client,
    DrafterInfo,
    GenerationResult,
    Limits,
    RetryPolicy,
    ServerInfo,
    SpecFleetError,
    SpeculationStats,
    StreamChunk,
    Timings,
    Usage,
    VerifierGroupInfo,
)

__all__ = [
    "AsyncClient",
    "Client",
    "DrafterInfo",
    "GenerationResult",
    "Limits",
    "RetryPolicy",
    "ServerInfo",
    "SpecFleetError",
    "SpeculationStats",
    "StreamChunk",
    "Timings",
    "Usage",
    "VerifierGroupInfo",
]
