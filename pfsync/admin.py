"""Who may use a node: the admin check every gRPC service shares, and the read-token gate.

- Admin calls (Set, Inject, Kill, Clear...) need ``authorization: Bearer <admin token>``
  when ``--admin-token-file`` is set, else a loopback client (`require_admin`).
- With ``--read-token-file``, every other call too needs ``Bearer <read token>`` (or the
  admin token): `ReadAccess`, a server interceptor, so each service need not repeat it.
  The health service stays open, for load balancers and orchestrators.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from pfsync.config import is_loopback_peer

# Methods anyone may call even when reads need a token.
OPEN_METHODS = ("/grpc.health.v1.Health/",)


class Refusals:
    """Calls refused for want of rights, by kind (``net.pf.api.denied`` shows ``admin``)."""

    def __init__(self) -> None:
        self.admin = 0
        self.read = 0


# One per process (a process runs one node): every service counts into it.
REFUSALS = Refusals()


def _bearer_matches(given: str, token: str) -> bool:
    # Constant-time; an empty token never matches (it would accept "Bearer ").
    return bool(token) and hmac.compare_digest(given.encode(), f"Bearer {token}".encode())


def is_admin(context: grpc.aio.ServicerContext[Any, Any], token: str | None) -> bool:
    """Whether the call would pass `require_admin` (for calls that show less to others)."""
    if token is None:
        return is_loopback_peer(context.peer())
    metadata = dict(context.invocation_metadata() or ())
    return _bearer_matches(str(metadata.get("authorization", "")), token)


async def require_admin(context: grpc.aio.ServicerContext[Any, Any], token: str | None) -> None:
    """Abort the call unless it carries the admin token (or, with none set, is local)."""
    if token is None:
        if not is_loopback_peer(context.peer()):
            REFUSALS.admin += 1
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, "admin calls are allowed from loopback only"
            )
        return
    metadata = dict(context.invocation_metadata() or ())
    given = str(metadata.get("authorization", ""))
    if not _bearer_matches(given, token):
        REFUSALS.admin += 1
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong admin token")


class ReadAccess(grpc.aio.ServerInterceptor):
    """Refuse calls that lack the read (or admin) token, when a read token is set.

    ``read_token`` and ``admin_token`` are plain attributes so that a config reload
    (SIGHUP) can rotate them in place.
    """

    def __init__(self, read_token: str | None, admin_token: str | None) -> None:
        self.read_token = read_token
        self.admin_token = admin_token

    def allows(self, metadata: Any) -> bool:
        """Whether call metadata carries an accepted token (always, without a read token)."""
        if self.read_token is None:
            return True
        given = ""
        for key, value in metadata or ():
            if key == "authorization":
                given = str(value)
        return _bearer_matches(given, self.read_token) or _bearer_matches(
            given, self.admin_token or ""
        )

    async def intercept_service(  # type: ignore[override]
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_METHODS):
            return handler
        if self.allows(handler_call_details.invocation_metadata):
            return handler
        return _refusal(handler)


async def _refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    REFUSALS.read += 1
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong read token")


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that refuses the call."""
    kinds = {
        "unary_unary": grpc.unary_unary_rpc_method_handler,
        "unary_stream": grpc.unary_stream_rpc_method_handler,
        "stream_unary": grpc.stream_unary_rpc_method_handler,
        "stream_stream": grpc.stream_stream_rpc_method_handler,
    }
    for kind, make in kinds.items():
        if getattr(handler, kind) is not None:
            return make(
                _refuse,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    raise AssertionError("a handler of no known kind")
