"""SpecFleet's public API contract and its client SDK.

- ``specfleet.proto`` (the .proto file next to this one): the gRPC service
  ``specfleet.v1.SpecFleet`` — Generate, GenerateStream, Info.
- ``specfleet_pb2`` / ``specfleet_pb2_grpc``: stubs generated from it by
  ``make proto`` (``scripts/gen_proto.py``); never edit them by hand.
- ``client``: the Python SDK (also importable as ``specfleet.client``).

Nothing here imports torch, Ray or transformers: clients need only grpc.
"""
