"""Who may change a node: the one admin check every gRPC service shares."""

from __future__ import annotations

import hmac

import grpc

from pfsync.config import is_loopback_peer


async def require_admin(context: grpc.aio.ServicerContext, token: str | None) -> None:
    """Abort the call unless it carries the admin token (or, with none set, is local)."""
    if token is None:
        if not is_loopback_peer(context.peer()):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, "admin calls are allowed from loopback only"
            )
        return
    metadata = dict(context.invocation_metadata() or ())
    given = str(metadata.get("authorization", ""))
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong admin token")
