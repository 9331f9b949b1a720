"""TLS for the node's gRPC endpoints: server credentials, channel credentials, peer names.

One place that turns PEM files into grpc credentials, shared by the control API (pfsyncd
``--tls-cert/--tls-key/--tls-ca``), the tools (``--tls-ca``, optional client certificate)
and the pfsync peer links (mutual TLS, ``--peer-allow NAME`` checks `peer_names`).

Files are read and checked here, so a missing, unreadable or non-PEM file is a `TLSError`
with a one-line message naming it, not a gRPC core error at bind or connect time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc

# Upper bound of a PEM file we read (a CA bundle is ~200 KB): anything larger is a mistake.
MAX_PEM = 4 * 1024 * 1024


class TLSError(Exception):
    """A certificate, key or CA file that cannot be used; the message is one line."""


def read_pem(path: Path, what: str) -> bytes:
    """The bytes of a PEM file (``what``: "certificate", "private key", "CA bundle")."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PEM + 1)
    except OSError as exc:
        raise TLSError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    if len(data) > MAX_PEM:
        raise TLSError(f"{path}: {what} file is larger than {MAX_PEM} bytes")
    if b"-----BEGIN " not in data:
        raise TLSError(f"{path}: {what} is not in PEM format")
    return data


def server_credentials(
    cert_file: Path, key_file: Path, client_ca_file: Path | None = None
) -> grpc.ServerCredentials:
    """Credentials for ``server.add_secure_port``.

    With ``client_ca_file`` the server requires every client to present a certificate
    signed by that CA (mutual TLS); without it, any client may connect over TLS.
    """
    chain = read_pem(cert_file, "certificate")
    key = read_pem(key_file, "private key")
    ca = read_pem(client_ca_file, "CA bundle") if client_ca_file is not None else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=ca, require_client_auth=ca is not None
    )


def channel_credentials(
    ca_file: Path | None = None, cert_file: Path | None = None, key_file: Path | None = None
) -> grpc.ChannelCredentials:
    """Credentials for ``grpc.secure_channel`` / ``grpc.aio.secure_channel``.

    ``ca_file`` is the CA that signed the server (None: the system's trust store);
    ``cert_file`` and ``key_file`` (both or neither) are this client's own certificate,
    for servers that require one.
    """
    if (cert_file is None) != (key_file is None):
        raise TLSError("a client certificate needs both the certificate and its key")
    ca = read_pem(ca_file, "CA bundle") if ca_file is not None else None
    chain = read_pem(cert_file, "certificate") if cert_file is not None else None
    key = read_pem(key_file, "private key") if key_file is not None else None
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=chain
    )


def peer_names(
    context: grpc.aio.ServicerContext[Any, Any] | grpc.ServicerContext,
) -> list[str]:
    """The names a TLS client proved with its certificate: subject alternative names and
    the common name (empty without TLS or without a client certificate)."""
    auth = context.auth_context() or {}
    names: list[str] = []
    for key in ("x509_subject_alternative_name", "x509_common_name"):
        for value in auth.get(key, ()):
            name = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            if name not in names:
                names.append(name)
    return names
