"""gRPC server reflection, both protocol versions, with the .proto comments included.

grpcio-reflection (1.85) serves only ``grpc.reflection.v1alpha`` and builds its answers
with ``FileDescriptor.CopyToProto``, which drops source info, so clients would see the
API without its documentation. This module serves both ``grpc.reflection.v1`` and
``grpc.reflection.v1alpha`` (the two protocols are the same messages under two package
names, so one implementation with the v1alpha message classes speaks both on the wire),
and answers with the FileDescriptorProtos of ``pfsync/v1/descriptors.binpb``, which
protoc wrote with ``--include_source_info`` (see pfsync/_protogen.py). Files outside that
set (health, reflection itself) come from the default pool, without comments.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from importlib import resources
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_reflection.v1alpha import reflection_pb2 as rpb

#: The descriptor set pfsync/_protogen.py writes (its DESCRIPTOR_SET; not imported from
#: there because _protogen needs grpc_tools, a build-time dependency only).
DESCRIPTOR_SET = "descriptors.binpb"
#: The two reflection services this module answers as.
SERVICE_NAMES = ("grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection")


def load_documented_files() -> dict[str, bytes]:
    """File name -> serialized FileDescriptorProto with comments, from the descriptor set."""
    data = (resources.files("pfsync.v1") / DESCRIPTOR_SET).read_bytes()
    files = descriptor_pb2.FileDescriptorSet.FromString(data).file
    return {f.name: f.SerializeToString() for f in files}


class ReflectionServicer:
    """Answers ServerReflectionInfo streams from the default descriptor pool."""

    def __init__(self, service_names: Iterable[str], documented: dict[str, bytes]) -> None:
        self.service_names = sorted(set(service_names) | set(SERVICE_NAMES))
        self.documented = documented
        self.pool = descriptor_pool.Default()

    def _serialized(self, descriptor: FileDescriptor) -> bytes:
        if descriptor.name in self.documented:
            return self.documented[descriptor.name]
        proto = descriptor_pb2.FileDescriptorProto()
        descriptor.CopyToProto(proto)
        return proto.SerializeToString()

    def _files(self, descriptor: FileDescriptor) -> rpb.FileDescriptorResponse:
        """The file and everything it imports, the file itself first."""
        seen: dict[str, FileDescriptor] = {}
        todo = [descriptor]
        while todo:
            current = todo.pop()
            if current.name not in seen:
                seen[current.name] = current
                todo.extend(current.dependencies)
        return rpb.FileDescriptorResponse(
            file_descriptor_proto=[self._serialized(d) for d in seen.values()]
        )

    def answer(self, request: rpb.ServerReflectionRequest) -> rpb.ServerReflectionResponse:
        """One reply to one request of the stream."""
        reply = rpb.ServerReflectionResponse(valid_host=request.host, original_request=request)
        kind = request.WhichOneof("message_request")
        try:
            if kind == "list_services":
                reply.list_services_response.service.extend(
                    rpb.ServiceResponse(name=name) for name in self.service_names
                )
            elif kind == "file_by_filename":
                found = self.pool.FindFileByName(request.file_by_filename)
                reply.file_descriptor_response.CopyFrom(self._files(found))
            elif kind == "file_containing_symbol":
                found = self.pool.FindFileContainingSymbol(request.file_containing_symbol)
                reply.file_descriptor_response.CopyFrom(self._files(found))
            elif kind == "all_extension_numbers_of_type":
                name = request.all_extension_numbers_of_type
                message = self.pool.FindMessageTypeByName(name)
                reply.all_extension_numbers_response.base_type_name = name
                reply.all_extension_numbers_response.extension_number.extend(
                    sorted(ext.number for ext in self.pool.FindAllExtensions(message))
                )
            elif kind == "file_containing_extension":
                ext = request.file_containing_extension
                message = self.pool.FindMessageTypeByName(ext.containing_type)
                field = self.pool.FindExtensionByNumber(message, ext.extension_number)
                # FieldDescriptor.file exists (upb) but is missing from the stubs.
                reply.file_descriptor_response.CopyFrom(self._files(field.file))  # type: ignore[attr-defined]
            else:
                code = grpc.StatusCode.INVALID_ARGUMENT
                reply.error_response.error_code = code.value[0]
                reply.error_response.error_message = "unknown reflection request"
        except KeyError:
            reply.ClearField("message_response")
            reply.error_response.error_code = grpc.StatusCode.NOT_FOUND.value[0]
            reply.error_response.error_message = "not found"
        return reply

    async def ServerReflectionInfo(
        self,
        requests: AsyncIterator[rpb.ServerReflectionRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[rpb.ServerReflectionResponse]:
        """The reflection stream: one reply per request, in order."""
        async for request in requests:
            yield self.answer(request)


def enable_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> None:
    """Serve reflection v1 and v1alpha for ``service_names`` (plus reflection itself)."""
    servicer = ReflectionServicer(service_names, load_documented_files())
    method = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=rpb.ServerReflectionRequest.FromString,
        response_serializer=rpb.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": method})
            for name in SERVICE_NAMES
        ]
    )
