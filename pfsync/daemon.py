"""pfsyncd: run a node — a state table fed by capture replays and live interfaces, served
over gRPC (Control, health, reflection).

Usage errors and unusable settings print one line and exit 2; a running node logs one
line per notable event and stops cleanly on SIGINT/SIGTERM (also during
``--exit-after-replay``). SIGHUP re-reads the config file and the token files, applies what
can change while running (``[sysctl]`` values, ``limit_states``, tokens) and logs what it
changed and what needs a restart; a config that fails to load is logged and ignored.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import ipaddress
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import grpc
from google.protobuf.internal import api_implementation
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pfsync.admin import ReadAccess
from pfsync.config import ConfigError, NodeConfig, load_config, read_token_file
from pfsync.control import ControlService
from pfsync.logs import limit_grpc_call_errors
from pfsync.metrics import registry_for, serve_metrics
from pfsync.netif import local_networks, parse_networks
from pfsync.netstat_nodes import add_sync_netstat_nodes
from pfsync.node import Node, tune_process
from pfsync.reflection import enable_reflection
from pfsync.sync.engine import SyncEngine
from pfsync.sync.peer import SERVER_OPTIONS, SyncDriver
from pfsync.sysctl import SysctlError, add_sync_nodes
from pfsync.sysctl_service import SysctlService
from pfsync.tap_service import TapService
from pfsync.taps import PFSYNC_IF
from pfsync.tls import TLSError, channel_credentials, server_credentials
from pfsync.v1 import (
    control_pb2,
    control_pb2_grpc,
    sync_pb2,
    sync_pb2_grpc,
    sysctl_pb2,
    sysctl_pb2_grpc,
    tap_pb2,
    tap_pb2_grpc,
)
from statetable.mslt import Network

PROG = "pfsyncd"
log = logging.getLogger(PROG)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"{PROG}: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    """pfsyncd's flags; each may also come from PFSYNCD_<NAME> or the --config file."""
    p = _Parser(
        prog=PROG,
        description="Run a pfsyncd node: a pf-style state table fed by "
        "capture replays and live interfaces, served over gRPC.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML file with the same settings (flags and PFSYNCD_* env win)",
    )
    p.add_argument(
        "--hostid", metavar="HEX", help="creatorid of states made here (default: random 32-bit)"
    )
    p.add_argument("--control", metavar="ADDR", help="Control API address (default 127.0.0.1:7070)")
    p.add_argument(
        "--sync-listen",
        metavar="ADDR",
        help="pfsync endpoint peers dial (default 127.0.0.1:7071; empty: none)",
    )
    p.add_argument(
        "--peer",
        action="append",
        metavar="ADDR",
        help="a peer to sync with: HOST:PORT of its --sync-listen (repeatable)",
    )
    p.add_argument(
        "--peer-allow",
        action="append",
        metavar="NAME",
        help="certificate name (CN or SAN) of a peer allowed to sync (repeatable; "
        "default: any peer the CA signed)",
    )
    p.add_argument(
        "--pcap",
        type=Path,
        action="append",
        metavar="FILE",
        help="replay a pcap/pcapng capture into the table (repeatable)",
    )
    p.add_argument(
        "--replay-speed",
        type=float,
        metavar="X",
        help="0 = as fast as possible (default), 1 = real time, 2 = twice as fast",
    )
    p.add_argument(
        "--capture",
        action="append",
        metavar="IFACE",
        help="track live traffic of an interface (Linux AF_PACKET, root; repeatable)",
    )
    p.add_argument(
        "--metrics", metavar="ADDR", help="serve Prometheus metrics on HOST:PORT (default off)"
    )
    p.add_argument(
        "--limit-states", type=int, metavar="N", help="hard state limit (default 100000)"
    )
    p.add_argument(
        "--local-net",
        action="append",
        metavar="CIDR",
        help="a network MSLT counts as local (repeatable; default: the networks "
        "of this host's interfaces)",
    )
    p.add_argument(
        "--sysctl",
        action="append",
        metavar="NAME=VALUE",
        help="set a sysctl at start-up, as pfsysctl -w does (repeatable; also a "
        "[sysctl] table in the config file)",
    )
    p.add_argument(
        "--admin-token-file",
        type=Path,
        metavar="FILE",
        help="token required for admin calls (default: admin calls from loopback only)",
    )
    p.add_argument(
        "--read-token-file",
        type=Path,
        metavar="FILE",
        help="token required for read calls too (the admin token also works; default: open)",
    )
    p.add_argument(
        "--tls-cert",
        type=Path,
        metavar="FILE",
        help="serve the control API and the pfsync peer links over TLS with this PEM "
        "certificate chain (also shown to peers this node dials)",
    )
    p.add_argument("--tls-key", type=Path, metavar="FILE", help="PEM private key of --tls-cert")
    p.add_argument(
        "--tls-ca",
        type=Path,
        metavar="FILE",
        help="require client and peer certificates signed by this PEM CA (mutual TLS)",
    )
    p.add_argument(
        "--exit-after-replay",
        action="store_true",
        default=False,
        help="stop once every --pcap file is replayed (no --capture allowed)",
    )
    p.add_argument("-v", "--verbose", action="store_true", default=False, help="log debug details")
    return p


def _local_nets(config: NodeConfig) -> list[Network]:
    """--local-net, or else this host's interface networks (none if they cannot be read)."""
    if config.local_net:
        return parse_networks(config.local_net)
    try:
        return local_networks()
    except OSError as exc:
        log.warning("MSLT local networks unknown (%s): only loopback and remote classes", exc)
        return []


def _sysctl_text(value: str | int | bool) -> str:
    # TOML gives typed values; sysctl parses text (true -> 1 keeps one parser).
    return str(int(value)) if isinstance(value, bool) else str(value)


def _sysctl_flags(items: list[str]) -> dict[str, str]:
    """--sysctl NAME=VALUE flags as a dict; ValueError in one line if malformed."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--sysctl {item!r} is not NAME=VALUE")
        out[name.strip()] = value.strip()
    return out


@dataclass
class Secrets:
    """Tokens read from their files (None: not set), checked before the node starts."""

    admin_token: str | None
    read_token: str | None

    @classmethod
    def load(cls, config: NodeConfig) -> Secrets:
        """Read the token files; ConfigError (one line) if one is unusable."""
        admin = (
            read_token_file(config.admin_token_file, "admin token")
            if config.admin_token_file
            else None
        )
        read = (
            read_token_file(config.read_token_file, "read token")
            if config.read_token_file
            else None
        )
        return cls(admin, read)


def is_loopback_address(address: str) -> bool:
    """Whether a HOST:PORT listen address is reachable from this host only."""
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind_problem(address: str) -> str:
    """Why ``address`` cannot be listened on ("" if a plain socket can bind it)."""
    host, _, port = address.rpartition(":")
    try:
        infos = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        return f"cannot resolve {host}: {getattr(exc, 'strerror', None) or exc}"
    for family, kind, proto, _name, sockaddr in infos:
        with socket.socket(family, kind, proto) as sock:
            # As grpc does: a port whose old connections linger in TIME_WAIT is free.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                return exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
    return ""


class _Running:
    """What a SIGHUP reload may change in a running node."""

    def __init__(
        self,
        node: Node,
        config: NodeConfig,
        services: list[ControlService | SysctlService | TapService],
        access: ReadAccess,
    ) -> None:
        self.node = node
        self.config = config
        self.services = services
        self.access = access

    def set_tokens(self, secrets: Secrets) -> None:
        """Use these tokens from the next call on."""
        for service in self.services:
            service.admin_token = secrets.admin_token
        self.access.read_token = secrets.read_token
        self.access.admin_token = secrets.admin_token

    def reload(self, load: Callable[[], NodeConfig]) -> None:
        """SIGHUP: re-read the config and the token files; log one line of what changed."""
        try:
            new = load()
            secrets = Secrets.load(new)
            old_sysctl = {**self.config.sysctl, "net.pf.limit.states": self.config.limit_states}
            new_sysctl = {**new.sysctl, "net.pf.limit.states": new.limit_states}
            changed = {k: v for k, v in new_sysctl.items() if old_sysctl.get(k) != v}
            for name, value in changed.items():  # check all before applying any
                self.node.sysctl.node(name).parse(_sysctl_text(value))
        except (ConfigError, SysctlError) as exc:
            log.error("SIGHUP: config not reloaded: %s", exc)
            return
        done = []
        for name, value in changed.items():
            old, now = self.node.sysctl.set(name, _sysctl_text(value))
            done.append(f"{name} {old} -> {now}")
        self.set_tokens(secrets)
        fixed = ("control", "pcap", "capture", "local_net", "replay_speed", "tls_cert", "tls_key")
        restart = [f for f in (*fixed, "tls_ca") if getattr(new, f) != getattr(self.config, f)]
        if "hostid" in new.model_fields_set and new.hostid != self.config.hostid:
            restart.append("hostid")
        self.config = new.model_copy(update={"hostid": self.config.hostid})
        log.info(
            "SIGHUP: config reloaded (%s), tokens re-read%s",
            "; ".join(done) or "no sysctl changed",
            f"; {', '.join(restart)} changed: restart to apply" if restart else "",
        )


async def serve(
    config: NodeConfig,
    exit_after_replay: bool = False,
    reload: Callable[[], NodeConfig] | None = None,
) -> int:
    """Run a node until a signal (or the end of the replays); returns the exit status.

    ``reload`` loads the config again for SIGHUP (None: SIGHUP only re-reads the tokens).
    """
    try:
        secrets = Secrets.load(config)
        credentials = (
            server_credentials(config.tls_cert, config.tls_key, config.tls_ca)
            if config.tls_cert is not None and config.tls_key is not None
            else None
        )
    except (ConfigError, TLSError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    node = Node(config.hostid, limit_states=config.limit_states, local_nets=_local_nets(config))
    engine = SyncEngine(node.table)
    add_sync_nodes(node.sysctl, engine)
    add_sync_netstat_nodes(node, engine)
    try:
        for name, value in config.sysctl.items():
            node.sysctl.set(name, _sysctl_text(value))
    except SysctlError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    access = ReadAccess(secrets.read_token, secrets.admin_token)
    server = grpc.aio.server(interceptors=[access], options=[("grpc.so_reuseport", 0)])
    control = ControlService(node, secrets.admin_token)
    sysctl = SysctlService(node.sysctl, secrets.admin_token)
    control_pb2_grpc.add_ControlServiceServicer_to_server(control, server)
    sysctl_pb2_grpc.add_SysctlServiceServicer_to_server(sysctl, server)
    taps = TapService(node.taps, secrets.admin_token)
    tap_pb2_grpc.add_TapServiceServicer_to_server(taps, server)
    # Health answers "" (the whole node) and each service by its full name; reflection
    # serves v1 and v1alpha, with the .proto comments (pfsync/reflection.py).
    services = (
        control_pb2.DESCRIPTOR.services_by_name["ControlService"].full_name,
        sysctl_pb2.DESCRIPTOR.services_by_name["SysctlService"].full_name,
        tap_pb2.DESCRIPTOR.services_by_name["TapService"].full_name,
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection(
        server, (*services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
    )
    # Checked with a plain socket first: it names the reason, where grpc core logs its own
    # multi-line error (and grpcio raises RuntimeError) for a port in use or a bad host.
    problem = _bind_problem(config.control)
    if problem:
        print(f"{PROG}: cannot listen on {config.control}: {problem}", file=sys.stderr)
        return 1
    try:
        if credentials is not None:
            port = server.add_secure_port(config.control, credentials)
        else:
            port = server.add_insecure_port(config.control)
    except RuntimeError:  # recent grpcio raises where older ones returned 0
        port = 0
    if port == 0:
        print(
            f"{PROG}: cannot listen on {config.control}: refused by gRPC",
            file=sys.stderr,
        )
        return 1
    await server.start()
    for name in ("", *services):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "hostid %08x, control API on %s (%s)",
        config.hostid,
        config.control,
        "TLS, client certificates required"
        if config.tls_ca
        else "TLS"
        if credentials
        else "plain text",
    )
    if credentials is None and not is_loopback_address(config.control):
        log.warning(
            "control API on %s without TLS: tokens and states cross the network in clear "
            "text (use --tls-cert/--tls-key)",
            config.control,
        )
    if secrets.read_token is None and not is_loopback_address(config.control):
        log.warning("read calls are open to any client that reaches %s", config.control)
    try:
        driver, sync_server = await _start_sync(config, node, engine, health_servicer)
    except (OSError, TLSError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        await server.stop(None)
        return 1

    try:
        for ifname in config.capture:
            node.start_capture(ifname)
    except OSError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        await server.stop(None)
        return 1
    for path in config.pcap:
        node.start_replay(path, config.replay_speed)
    metrics = None
    if config.metrics:
        try:
            metrics = await serve_metrics(config.metrics, registry_for(node, engine))
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            print(
                f"{PROG}: cannot serve metrics on {config.metrics}: {reason}",
                file=sys.stderr,
            )
            await server.stop(None)
            return 1
        log.info("Prometheus metrics on http://%s/metrics", config.metrics)
    purge = asyncio.create_task(node.purge_forever())

    running = _Running(node, config, [control, sysctl, taps], access)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, running.reload, reload or (lambda: running.config))
    waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(stop.wait())]
    replays = [s.task for s in node.sources if s.task is not None]
    if exit_after_replay:
        waits.append(asyncio.ensure_future(asyncio.gather(*replays)))
    # A signal stops the node even while replays run (--exit-after-replay waited on them only).
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in [*waits, *replays]:
        task.cancel()
    await asyncio.gather(*replays, return_exceptions=True)
    purge.cancel()
    if metrics is not None:
        metrics.close()
    if driver is not None:
        await driver.stop()
    if sync_server is not None:
        await sync_server.stop(0.5)
    # Long-lived streams end with a status first; the grace period lets them send it.
    node.taps.close()
    control.watches.close()
    await server.stop(1.0)
    failed = [s for s in node.sources if s.error]
    return 1 if failed else 0


DEFAULT_SYNC_LISTEN = "127.0.0.1:7071"
SYNC_SERVICE = sync_pb2.DESCRIPTOR.services_by_name["SyncService"].full_name


def _peer_credentials(
    config: NodeConfig,
) -> tuple[grpc.ServerCredentials | None, grpc.ChannelCredentials | None]:
    """Peer links: plain text, or TLS with --tls-cert/--tls-key (mutual with --tls-ca:
    each end must present a certificate the CA signed); TLSError in one line."""
    if config.tls_cert is None or config.tls_key is None:
        return None, None
    return (
        server_credentials(config.tls_cert, config.tls_key, config.tls_ca),
        channel_credentials(config.tls_ca, config.tls_cert, config.tls_key),
    )


async def _start_sync(
    config: NodeConfig,
    node: Node,
    engine: SyncEngine,
    health_servicer: health.aio.HealthServicer,
) -> tuple[SyncDriver | None, grpc.aio.Server | None]:
    """pfsync: the listener (--sync-listen) and the dialers (--peer), when configured."""
    listen = DEFAULT_SYNC_LISTEN if config.sync_listen is None else config.sync_listen
    if not listen and not config.peer:
        await health_servicer.set(SYNC_SERVICE, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
        return None, None
    listener_credentials, dialer_credentials = _peer_credentials(config)
    loop = asyncio.get_running_loop()

    def ready(now_ready: bool) -> None:
        status = health_pb2.HealthCheckResponse
        loop.create_task(
            health_servicer.set(SYNC_SERVICE, status.SERVING if now_ready else status.NOT_SERVING)
        )
        if now_ready:
            log.info("pfsync ready")

    driver = SyncDriver(
        engine,
        node.publish_changes,
        node.clock,
        peers=config.peer,
        credentials=dialer_credentials,
        allow=config.peer_allow,
        on_ready=ready,
        listen_address=listen,
    )
    node.add_consumer(driver.consume)
    node.sync = driver
    # pfsync0: the driver serializes its frames for taps only while one is attached.
    node.taps.interface(PFSYNC_IF)
    node.taps.on_sync_tapped = lambda on: setattr(
        driver, "tap", node.taps.put_sync_frame if on else None
    )
    sync_server = None
    if listen:
        sync_server = grpc.aio.server(options=SERVER_OPTIONS)
        sync_pb2_grpc.add_SyncServiceServicer_to_server(driver, sync_server)
        try:
            if listener_credentials is None:
                port = sync_server.add_insecure_port(listen)
            else:
                port = sync_server.add_secure_port(listen, listener_credentials)
        except RuntimeError:
            port = 0
        if port == 0 and config.sync_listen is None:
            # Only the default was taken (another node on this host): run without it.
            log.warning("pfsync: %s is in use; accepting no peers (set --sync-listen)", listen)
            sync_server, driver.listen_address = None, ""
        elif port == 0:
            raise OSError(f"cannot listen on {listen} (pfsync)")
        else:
            await sync_server.start()
            log.info("pfsync on %s, peers: %s", listen, ", ".join(config.peer) or "none")
    driver.start()
    return driver, sync_server


def _reloader(
    flags: dict[str, object], config_file: Path | None, sysctl_flags: dict[str, str]
) -> Callable[[], NodeConfig]:
    """Load the config as at start-up (flags and env over the file), for SIGHUP."""

    def load() -> NodeConfig:
        config = load_config(flags, config_file)
        config.sysctl = {**config.sysctl, **sysctl_flags}
        return config

    return load


def main(argv: list[str] | None = None) -> int:
    """Console entry point."""
    if api_implementation.Type() != "upb":
        print(
            f"{PROG}: protobuf runs its slow '{api_implementation.Type()}' backend; "
            "install protobuf's upb wheels",
            file=sys.stderr,
        )
        return 1
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config", None)
    exit_after_replay = args.pop("exit_after_replay")
    verbose = args.pop("verbose")
    try:
        sysctl_flags = _sysctl_flags(args.pop("sysctl", []))
        config = load_config(args, config_file)
    except (ConfigError, ValueError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    # Flags win over the config file, one sysctl at a time (like sysctl.conf then -w).
    config.sysctl = {**config.sysctl, **sysctl_flags}
    for path in config.pcap:
        if not os.access(path, os.R_OK) or not path.is_file():
            print(f"{PROG}: {path}: cannot read capture file", file=sys.stderr)
            return 2
    if exit_after_replay and (config.capture or not config.pcap):
        print(f"{PROG}: --exit-after-replay needs --pcap and no --capture", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format=f"{PROG}: %(message)s",
        stream=sys.stderr,
    )
    limit_grpc_call_errors()  # a malformed request per call must not flood the log
    tune_process()
    try:
        return asyncio.run(
            serve(config, exit_after_replay, _reloader(args, config_file, sysctl_flags))
        )
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
