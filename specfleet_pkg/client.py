"""``specfleet.client``: the Python client SDK (defined in ``specfleet.proto.client``).

Imports only grpc and the generated stubs — never torch, Ray or transformers.
"""

from specfleet.proto import client as _sdk
from specfleet.proto.client import *  # noqa: F403 - the SDK's public names, listed once there

__all__ = list(_sdk.__all__)
