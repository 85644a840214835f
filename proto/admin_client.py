"""The admin SDK: list, add and remove drafters of a running SpecFleet server.

Where it sits: the operator's side of the ``SpecFleetAdmin`` service
(``proto/specfleet.proto``, served by ``router/admin.py``); ``specfleet drafters``
is a thin CLI over it. Like ``Client`` it imports only grpc and the stubs.

    from specfleet.proto.admin_client import AdminClient

    with AdminClient("127.0.0.1:50051", admin_token="s3cret") as admin:
        admin.add_drafter({"name": "ngram2", "kind": "ngram", "resources": {"num_cpus": 0.1}})
        print([d.name for d in admin.drafters()])
        admin.remove_drafter("ngram2")
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from specfleet.proto import specfleet_pb2 as pb
from specfleet.proto import specfleet_pb2_grpc as pb_grpc
from specfleet.proto.client import Client, DrafterInfo, RetryPolicy

ADMIN_TOKEN_METADATA = "x-specfleet-admin-token"  # keep equal to router/admin.py


class AdminClient(Client):
    """``Client`` plus the admin calls; ``admin_token`` is the server's
    ``server.admin_token`` (``token`` stays the clients' bearer token, if any).
    Adding is not retried: a lost reply could otherwise start the drafter twice."""

    def __init__(self, target: str, *, admin_token: str, **kwargs):
        super().__init__(target, **kwargs)
        self._metadata = (*self._metadata, (ADMIN_TOKEN_METADATA, admin_token))
        self._admin = pb_grpc.SpecFleetAdminStub(self._channel)

    def drafters(self, *, timeout: float | None = None) -> list[DrafterInfo]:
        return _drafters(self._call(self._admin.ListDrafters, pb.ListDraftersRequest(), timeout))

    def add_drafter(self, config: Mapping | str, *, timeout: float | None = 600.0) -> list[DrafterInfo]:
        """Start a drafter from one ``drafters:`` entry (a mapping, or YAML/JSON text);
        returns the drafters deployed after it joined. Loading a model drafter or
        placing its actor takes a while: the default timeout is 10 minutes."""
        text = config if isinstance(config, str) else json.dumps(dict(config))
        retry, self.retry = self.retry, RetryPolicy(attempts=1)
        try:
            return _drafters(self._call(self._admin.AddDrafter, pb.AddDrafterRequest(config=text), timeout))
        finally:
            self.retry = retry

    def remove_drafter(self, name: str, *, timeout: float | None = 120.0) -> list[DrafterInfo]:
        return _drafters(self._call(self._admin.RemoveDrafter, pb.RemoveDrafterRequest(name=name), timeout))


def _drafters(msg: pb.DrafterList) -> list[DrafterInfo]:
    return [DrafterInfo(d.name, d.kind, d.domain) for d in msg.drafters]
