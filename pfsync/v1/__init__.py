"""Version 1 of the pfsyncd gRPC API.

The modules here (``control_pb2``, ``control_pb2_grpc``) are generated from
``proto/pfsync/v1/*.proto`` by ``python -m pfsync._protogen`` (also run by ``pip install``);
they are not kept in git and must not be edited. This file imports none of them, so the
package can be imported, and the code regenerated, before they exist.
"""
