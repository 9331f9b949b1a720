"""The SysctlService gRPC service: the node's sysctl tree on the wire (thin adapter)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import grpc

from pfsync.admin import is_admin, require_admin
from pfsync.sysctl import Kind, SysctlError, SysctlNode, SysctlTree, Value
from pfsync.v1 import sysctl_pb2 as pb
from pfsync.v1 import sysctl_pb2_grpc

T = TypeVar("T")
_STATUS = {
    "not-found": grpc.StatusCode.NOT_FOUND,
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "read-only": grpc.StatusCode.FAILED_PRECONDITION,
}
_TYPES = {
    Kind.INT: pb.SYSCTL_TYPE_INT,
    Kind.BOOL: pb.SYSCTL_TYPE_BOOL,
    Kind.STRING: pb.SYSCTL_TYPE_STRING,
    Kind.STRUCT: pb.SYSCTL_TYPE_STRUCT,
}
MAX_NAME = 256


def node_to_pb(node: SysctlNode, value: Value, name: str | None = None) -> pb.SysctlNode:
    """A node and one of its values on the wire."""
    msg = pb.SysctlNode(
        name=name or node.name,
        type=_TYPES[node.kind],
        writable=node.writable,
        description=node.description,
    )
    if node.kind is Kind.BOOL:
        msg.flag = bool(value)
    elif node.kind is Kind.INT:
        msg.integer = int(cast(int, value))
    elif node.kind is Kind.STRING:
        msg.text = str(value)
    else:
        fields = cast(list[tuple[str, int]], value)  # a struct's (or a field's) pairs
        msg.fields.fields.extend(pb.SysctlField(name=f, value=v) for f, v in fields)
    return msg


class SysctlService(sysctl_pb2_grpc.SysctlServiceServicer):
    """Serves a node's sysctl tree; SetSysctl is an admin call."""

    def __init__(self, tree: SysctlTree, admin_token: str | None = None) -> None:
        self.tree = tree
        self.admin_token = admin_token

    async def _tree(self, context: grpc.aio.ServicerContext[Any, Any], call: Callable[[], T]) -> T:
        """Run one tree operation; a SysctlError becomes its gRPC status, in one line."""
        try:
            return call()
        except SysctlError as exc:
            await context.abort(_STATUS[exc.code], str(exc))
            raise  # not reached: abort() raises

    async def _check_name(self, name: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if len(name) > MAX_NAME or not name.isprintable():
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed sysctl name")

    async def ListSysctls(
        self, request: pb.ListSysctlsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListSysctlsResponse:
        await self._check_name(request.prefix, context)
        found = await self._tree(context, lambda: self._listing(request.prefix))
        if any(node.private for node, _ in found) and not is_admin(context, self.admin_token):
            if all(node.private for node, _ in found):
                await require_admin(context, self.admin_token)  # asked for it by name
            # In a wider listing they are listed, their values left out (admins only).
            found = [(n, v) for n, v in found if not n.private] + [
                (n, "" if n.kind is Kind.STRING else []) for n, _ in found if n.private
            ]
            found.sort(key=lambda item: item[0].name)
        return pb.ListSysctlsResponse(nodes=[node_to_pb(node, value) for node, value in found])

    def _listing(self, prefix: str) -> list[tuple[SysctlNode, Value]]:
        """The nodes under ``prefix``, or the struct field it names (``...stats.ins``)."""
        try:
            return [(node, node.get()) for node in self.tree.list(prefix)]
        except SysctlError as exc:
            try:
                return [self.tree.get(prefix)]
            except SysctlError:
                raise exc from None

    async def GetSysctl(
        self, request: pb.GetSysctlRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetSysctlResponse:
        await self._check_name(request.name, context)
        node, value = await self._tree(context, lambda: self.tree.get(request.name))
        if node.private:
            await require_admin(context, self.admin_token)
        return pb.GetSysctlResponse(node=node_to_pb(node, value))

    async def SetSysctl(
        self, request: pb.SetSysctlRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.SetSysctlResponse:
        await require_admin(context, self.admin_token)
        await self._check_name(request.name, context)
        old, new = await self._tree(context, lambda: self.tree.set(request.name, request.value))
        node = self.tree.node(request.name)
        return pb.SetSysctlResponse(node=node_to_pb(node, new), previous=node_to_pb(node, old))
