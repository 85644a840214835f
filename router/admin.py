"""The admin service: drafters join and leave a running fleet (``SpecFleetAdmin``).

Where it sits: beside ``SpecFleetServicer`` on the same grpc.aio server
(``router/server.py``), reached by ``specfleet drafters list|add|remove`` and the
SDK's ``AdminClient``. A call passes the server's interceptors (bearer auth when
``server.auth_token`` is set, exception mapping), then the admin token check here,
then the backend: ``add_drafter`` builds the worker (loads a model, or places a Ray
actor) off the event loop and hands it to the engine between rounds;
``remove_drafter`` takes it out between rounds — requests it served go on, re-routed
or plainly decoded, and lose nothing.

The admin token is separate from the clients' bearer token: a client that may
generate may not reshape the fleet. Without ``server.admin_token`` the service is
off (PERMISSION_DENIED), so nothing can be changed by accident.
"""

from __future__ import annotations

import hmac
import logging

import grpc
import yaml

from specfleet.core.config import DrafterConfig
from specfleet.core.typed_yaml import ConfigError, from_mapping
from specfleet.proto import specfleet_pb2 as pb
from specfleet.proto import specfleet_pb2_grpc as pb_grpc
from specfleet.router.servicer import RequestError

logger = logging.getLogger(__name__)

ADMIN_SERVICE_NAME = "specfleet.v1.SpecFleetAdmin"
ADMIN_TOKEN_METADATA = "x-specfleet-admin-token"
MAX_CONFIG_CHARS = 16_384  # a drafter entry is a few lines


def _drafter_list(drafters) -> pb.DrafterList:
    return pb.DrafterList(drafters=[pb.DrafterInfo(name=d.name, kind=d.kind, domain=d.domain) for d in drafters])


def parse_drafter_config(text: str) -> DrafterConfig:
    """One ``drafters:`` entry (YAML or JSON) → DrafterConfig; RequestError naming the
    problem otherwise (never echoing an unbounded value)."""
    if len(text) > MAX_CONFIG_CHARS:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"config: at most {MAX_CONFIG_CHARS} characters, got {len(text)}")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"config: not YAML ({type(exc).__name__})") from None
    if isinstance(raw, list) and len(raw) == 1:  # a pasted `- name: ...` list item
        raw = raw[0]
    if not isinstance(raw, dict):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           "config: expected one drafter entry, e.g. {name: ngram2, kind: ngram}")
    try:
        return from_mapping(raw, DrafterConfig, "drafter")
    except (ConfigError, ValueError, TypeError) as exc:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(exc).splitlines()[0][:300]) from None


class AdminServicer(pb_grpc.SpecFleetAdminServicer):
    def __init__(self, backend, admin_token: str | None):
        self.backend = backend
        self._expected = admin_token.encode() if admin_token else None

    def _authorise(self, context: grpc.aio.ServicerContext) -> None:
        if self._expected is None:
            raise RequestError(grpc.StatusCode.PERMISSION_DENIED,
                               "the admin API is off: set server.admin_token to enable it")
        given = next((v for k, v in context.invocation_metadata() or () if k == ADMIN_TOKEN_METADATA), None)
        if given is None:
            raise RequestError(grpc.StatusCode.UNAUTHENTICATED, f"missing {ADMIN_TOKEN_METADATA} metadata")
        given = given.encode() if isinstance(given, str) else given
        if not hmac.compare_digest(given, self._expected):
            raise RequestError(grpc.StatusCode.PERMISSION_DENIED, "invalid admin token")

    def _need(self, method: str):
        fn = getattr(self.backend, method, None)
        if fn is None:
            raise RequestError(grpc.StatusCode.UNIMPLEMENTED, "this backend cannot change its drafters")
        return fn

    async def ListDrafters(self, request, context):
        self._authorise(context)
        return _drafter_list(self.backend.info().drafters)

    async def AddDrafter(self, request, context):
        self._authorise(context)
        dcfg = parse_drafter_config(request.config)
        add = self._need("add_drafter")
        try:
            drafters = await add(dcfg)
        except NotImplementedError as exc:
            raise RequestError(grpc.StatusCode.UNIMPLEMENTED, str(exc)) from None
        except ValueError as exc:
            code = (grpc.StatusCode.ALREADY_EXISTS if "already deployed" in str(exc)
                    else grpc.StatusCode.INVALID_ARGUMENT)
            raise RequestError(code, str(exc).splitlines()[0][:300]) from None
        except (FileNotFoundError, OSError) as exc:  # a model path that is not there
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"drafter {dcfg.name!r} could not start: {str(exc).splitlines()[0][:200]}") from None
        logger.info("admin: drafter %r (%s) joined", dcfg.name, dcfg.kind)
        return _drafter_list(drafters)

    async def RemoveDrafter(self, request, context):
        self._authorise(context)
        name = request.name
        if not name or len(name) > 128:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "name: 1 to 128 characters")
        remove = self._need("remove_drafter")
        if not any(d.name == name for d in self.backend.info().drafters):
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"no drafter named {name!r}")
        try:
            drafters = await remove(name)
        except ValueError as exc:  # the last drafter of a routed fleet
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, str(exc).splitlines()[0][:300]) from None
        logger.info("admin: drafter %r left", name)
        return _drafter_list(drafters)
