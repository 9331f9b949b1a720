"""Client plumbing shared by the pfsyncd tools (pfctl, pfnetstat, pfsysctl, pfdump).

The tools are gRPC clients of a node and nothing else: they import the generated
``pfsync.v1`` stubs and this module, never ``statetable`` or the daemon. This module owns
what every tool must do the same way (the tools contract in the README):

- find the node: ``-N/--node``, else ``$PFSYNC_NODE``, else ``127.0.0.1:7070``;
- find the admin token: ``--token-file``, else ``$PFSYNC_TOKEN`` (the token itself), sent
  as ``authorization: Bearer <token>`` metadata;
- TLS: ``--tls-ca FILE`` (else ``$PFSYNC_TLS_CA``) connects over TLS, trusting that CA;
  ``--tls-cert/--tls-key`` add a client certificate for nodes that require one;
- fail in one line, never a traceback: ``prog: message`` on stderr, exit 2 for usage
  errors, exit 1 for everything else (an unreachable node reads
  ``cannot reach node ADDR: reason``);
- ``--json``: protobuf messages as plain dicts, field names as in the .proto.

A tool's ``main`` builds a ``ToolArgumentParser``, calls ``add_common_arguments``, and
runs its body under ``run_tool``, raising ``ToolError`` / ``UsageError`` to fail.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from pfsync.tls import TLSError, channel_credentials
from pfsync.v1 import control_pb2_grpc, sysctl_pb2_grpc, tap_pb2_grpc

DEFAULT_NODE = "127.0.0.1:7070"
NODE_ENV = "PFSYNC_NODE"
TOKEN_ENV = "PFSYNC_TOKEN"
TLS_CA_ENV = "PFSYNC_TLS_CA"

#: Deadline of single request/reply calls. The control API answers in milliseconds; a
#: node that does not answer within this is treated as unreachable rather than waited on.
CALL_TIMEOUT = 5.0
#: Deadline of a whole streamed listing: a table of a million states takes a while.
STREAM_TIMEOUT = 300.0

EXIT_FAILURE = 1
EXIT_USAGE = 2


class ToolError(Exception):
    """A failure the tool reports as one line, ``prog: message``, with an exit status."""

    exit_code = EXIT_FAILURE


class UsageError(ToolError):
    """A mistake in the command line: exit status 2."""

    exit_code = EXIT_USAGE


class ToolArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors become ``UsageError`` (one line, exit 2).

    argparse's own ``error`` prints the whole usage text and exits; the tools' contract
    is a single line, and raising lets ``run_tool`` print it the same way as any failure.
    """

    def error(self, message: str) -> NoReturn:
        """Raise ``UsageError`` with argparse's message."""
        raise UsageError(message)

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:
        """Parse, refusing arguments that are not UTF-8 (they cannot go on the wire)."""
        for arg in sys.argv[1:] if args is None else args:
            try:
                str(arg).encode("utf-8")
            except UnicodeEncodeError:
                shown = str(arg).encode("utf-8", "surrogateescape")[:40]
                raise UsageError(f"argument {shown!r} is not UTF-8 text") from None
        return super().parse_args(args, namespace)


def count_arg(minimum: int = 1, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type for the tools' counts and sizes: a whole number (ASCII digits) in
    ``minimum..maximum``, or a one-line usage error."""

    def parse(text: str) -> int:
        if not (text.isascii() and text.isdigit()):
            raise UsageError(f"{text[:40]!r} is not a whole number")
        value = int(text)
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"{minimum}..{maximum}" if maximum is not None else f"at least {minimum}"
            raise UsageError(f"{value} is out of range ({bound})")
        return value

    return parse


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options every tool shares: ``-N/--node``, ``--token-file``, ``--json``."""
    parser.add_argument(
        "-N",
        "--node",
        metavar="ADDR",
        help=f"node control address (env {NODE_ENV}, default {DEFAULT_NODE})",
    )
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        type=Path,
        help=f"file holding the admin token (else env {TOKEN_ENV} holds the token)",
    )
    parser.add_argument(
        "--tls-ca",
        metavar="FILE",
        type=Path,
        help=f"connect over TLS, trusting this PEM CA (env {TLS_CA_ENV})",
    )
    parser.add_argument(
        "--tls-cert", metavar="FILE", type=Path, help="client certificate (PEM), with --tls-key"
    )
    parser.add_argument("--tls-key", metavar="FILE", type=Path, help="client private key (PEM)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")


@dataclass(frozen=True)
class NodeTarget:
    """Where a tool connects and with which token (``None``: send no authorization)."""

    address: str
    token: str | None
    credentials: grpc.ChannelCredentials | None = None  # None: plain text


def resolve_target(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> NodeTarget:
    """Pick the node address and token from the parsed options, then the environment.

    Raises ``UsageError`` when the token file cannot be read or is empty: the user named
    it, so silently sending no token would only produce a confusing refusal later.
    """
    if args.node is not None and not args.node.strip():
        raise UsageError("-N needs a node address")
    address = args.node or environ.get(NODE_ENV) or DEFAULT_NODE
    credentials = _credentials(args, environ)
    if args.token_file is not None:
        try:
            token = args.token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise UsageError(
                f"cannot read token file {args.token_file}: {exc.strerror or exc}"
            ) from None
        except UnicodeDecodeError:
            raise UsageError(f"token file {args.token_file} is not UTF-8 text") from None
        if not token:
            raise UsageError(f"token file {args.token_file} is empty")
        return NodeTarget(address, _checked_token(token), credentials)
    token = environ.get(TOKEN_ENV, "").strip() or None
    return NodeTarget(address, token and _checked_token(token), credentials)


def _checked_token(token: str) -> str:
    # gRPC metadata values are ASCII; anything else fails deep in gRPC core with a log dump.
    if not token.isascii() or not token.isprintable():
        raise UsageError("the token must be printable ASCII")
    return token


def _credentials(
    args: argparse.Namespace, environ: Mapping[str, str]
) -> grpc.ChannelCredentials | None:
    """TLS channel credentials from --tls-ca/--tls-cert/--tls-key (None: plain text)."""
    ca = getattr(args, "tls_ca", None) or (
        Path(environ[TLS_CA_ENV]) if environ.get(TLS_CA_ENV) else None
    )
    cert, key = getattr(args, "tls_cert", None), getattr(args, "tls_key", None)
    if ca is None and cert is None and key is None:
        return None
    try:
        return channel_credentials(ca, cert, key)
    except TLSError as exc:
        raise UsageError(str(exc)) from None


def _one_line(text: str) -> str:
    """Collapse whitespace so a server's message cannot break the one-line rule."""
    return " ".join(text.split())


def _unreachable_reason(details: str) -> str:
    """The useful tail of gRPC's connection error.

    gRPC reports e.g. ``failed to connect to all addresses; last error: UNKNOWN:
    ipv4:127.0.0.1:7070: Failed to connect to remote host: Connection refused``; the
    address is already in our message, so keep what comes after the last ``": "``.
    """
    tail = details.rsplit(": ", 1)[-1].strip(" []")
    return tail or details


class Node:
    """A connection to one node's control API.

    Wraps a synchronous gRPC channel: ``call`` and ``stream`` add the token metadata and
    deadlines, and turn gRPC failures into ``ToolError``. Use as a context manager so the
    channel is closed.
    """

    def __init__(self, target: NodeTarget, timeout: float = CALL_TIMEOUT) -> None:
        """Open a channel to ``target`` (lazily: nothing is sent until the first call)."""
        self.target = target
        self.timeout = timeout
        self._channel = (
            grpc.secure_channel(target.address, target.credentials)
            if target.credentials is not None
            else grpc.insecure_channel(target.address)
        )
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {target.token}"),) if target.token else ()
        )
        self.control = control_pb2_grpc.ControlServiceStub(self._channel)
        self.sysctl = sysctl_pb2_grpc.SysctlServiceStub(self._channel)
        self.taps = tap_pb2_grpc.TapServiceStub(self._channel)

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    @property
    def channel(self) -> grpc.Channel:
        """The channel, for multi-callables the stubs do not offer (e.g. pre-encoded requests)."""
        return self._channel

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The call metadata (the token), for calls made outside ``call`` (e.g. futures)."""
        return self._metadata

    def failure(self, exc: grpc.RpcError, timeout: float | None = None) -> ToolError:
        """The one-line ``ToolError`` for a call that failed outside ``call``/``stream``."""
        return self._failure(exc, self.timeout if timeout is None else timeout)

    def call(self, method: Callable[..., Any], request: Message) -> Any:
        """Make a unary call, e.g. ``node.call(node.control.GetInfo, GetInfoRequest())``."""
        try:
            return method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self._failure(exc, self.timeout) from None

    def stream(
        self, method: Callable[..., Any], request: Message, timeout: float | None = STREAM_TIMEOUT
    ) -> Iterator[Any]:
        """Make a server-streaming call and yield its messages as they arrive (``timeout``
        None: no deadline, for live views that run until Ctrl-C)."""
        try:
            yield from method(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self._failure(exc, STREAM_TIMEOUT if timeout is None else timeout) from None

    def _failure(self, exc: grpc.RpcError, timeout: float) -> ToolError:
        """Turn a failed call into a one-line ``ToolError``."""
        # Errors raised by calls are also grpc.Call objects, which carry code and details.
        code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
        details = _one_line((exc.details() if isinstance(exc, grpc.Call) else "") or "")
        address = self.target.address
        if code is grpc.StatusCode.UNAVAILABLE:
            return ToolError(f"cannot reach node {address}: {_unreachable_reason(details)}")
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return ToolError(f"cannot reach node {address}: no answer within {timeout:g}s")
        if code is grpc.StatusCode.UNAUTHENTICATED:
            return ToolError(
                f"node {address} wants a token (--token-file or {TOKEN_ENV}): {details}"
            )
        if code in _REFUSED_INPUT:
            # The node refused what the user asked for (a bad name or value): a usage error.
            return UsageError(details or code.name.lower().replace("_", " "))
        status = code.name.lower().replace("_", " ")
        return ToolError(f"node {address}: {status}" + (f": {details}" if details else ""))


_REFUSED_INPUT = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
)


def run_tool(prog: str, body: Callable[[], int]) -> int:
    """Run a tool's body and return its exit status, reporting failures in one line."""
    try:
        return body()
    except ToolError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`pfctl -s states | head`). Point stdout at /dev/null so the
        # interpreter's final flush does not raise again, as the Python docs advise.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE


def message_to_dict(message: Message) -> dict[str, Any]:
    """Return a message as a JSON-ready dict.

    Field names stay as in the .proto (``current_entries``, not ``currentEntries``) and
    zero values are included, so every key is always present. Otherwise this is proto3's
    JSON mapping: 64-bit integers are decimal strings (counters may exceed what a JSON
    double holds exactly), enums are their names, durations are "120s".
    """
    return json_format.MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )


def print_json(document: Any) -> None:
    """Print one JSON document on stdout."""
    json.dump(document, sys.stdout, indent=2)
    sys.stdout.write("\n")
