"""pfsyncd: run a node — a state table fed by capture replays and live interfaces, served
over gRPC (Control, health, reflection).

Usage errors and unusable settings print one line and exit 2; a running node logs one
line per notable event and stops cleanly on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

import grpc
from google.protobuf.internal import api_implementation
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pfsync.config import ConfigError, NodeConfig, load_config
from pfsync.control import ControlService
from pfsync.netif import local_networks, parse_networks
from pfsync.node import Node
from pfsync.reflection import enable_reflection
from pfsync.sync.engine import SyncEngine
from pfsync.sync.peer import SERVER_OPTIONS, SyncDriver, TlsFiles
from pfsync.sysctl import SysctlError, add_sync_nodes
from pfsync.sysctl_service import SysctlService
from pfsync.v1 import (
    control_pb2,
    control_pb2_grpc,
    sync_pb2,
    sync_pb2_grpc,
    sysctl_pb2,
    sysctl_pb2_grpc,
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
        "--tls-cert",
        type=Path,
        metavar="FILE",
        help="certificate (PEM) shown to peers; with --tls-key and --tls-ca peer links "
        "use mutual TLS",
    )
    p.add_argument("--tls-key", type=Path, metavar="FILE", help="private key of --tls-cert")
    p.add_argument(
        "--tls-ca",
        type=Path,
        metavar="FILE",
        help="CA certificate (PEM) that must sign every peer's certificate",
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


async def serve(config: NodeConfig, exit_after_replay: bool = False) -> int:
    """Run a node until a signal (or the end of the replays); returns the exit status."""
    node = Node(config.hostid, limit_states=config.limit_states, local_nets=_local_nets(config))
    engine = SyncEngine(node.table)
    add_sync_nodes(node.sysctl, engine)
    try:
        for name, value in config.sysctl.items():
            node.sysctl.set(name, _sysctl_text(value))
    except SysctlError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    admin_token = None
    if config.admin_token_file is not None:
        admin_token = config.admin_token_file.read_text().strip()
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    control_pb2_grpc.add_ControlServiceServicer_to_server(ControlService(node, admin_token), server)
    sysctl_pb2_grpc.add_SysctlServiceServicer_to_server(
        SysctlService(node.sysctl, admin_token), server
    )
    # Health answers "" (the whole node) and each service by its full name; reflection
    # serves v1 and v1alpha, with the .proto comments (pfsync/reflection.py).
    services = (
        control_pb2.DESCRIPTOR.services_by_name["ControlService"].full_name,
        sysctl_pb2.DESCRIPTOR.services_by_name["SysctlService"].full_name,
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection(
        server, (*services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
    )
    if server.add_insecure_port(config.control) == 0:
        print(f"{PROG}: cannot listen on {config.control}", file=sys.stderr)
        return 1
    await server.start()
    for name in ("", *services):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("hostid %08x, control API on %s", config.hostid, config.control)
    try:
        driver, sync_server = await _start_sync(config, node, engine, health_servicer)
    except OSError as exc:
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
    purge = asyncio.create_task(node.purge_forever())

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if exit_after_replay:
        await asyncio.gather(*(s.task for s in node.sources if s.task is not None))
    else:
        await stop.wait()
    purge.cancel()
    if driver is not None:
        await driver.stop()
    if sync_server is not None:
        await sync_server.stop(0.5)
    await server.stop(1.0)
    failed = [s for s in node.sources if s.error]
    return 1 if failed else 0


DEFAULT_SYNC_LISTEN = "127.0.0.1:7071"
SYNC_SERVICE = sync_pb2.DESCRIPTOR.services_by_name["SyncService"].full_name


def _tls_files(config: NodeConfig) -> TlsFiles | None:
    """The peers' mTLS material, or None for plaintext; OSError in one line."""
    paths = (config.tls_cert, config.tls_key, config.tls_ca)
    if not any(paths):
        return None
    if not all(paths):
        raise OSError("--tls-cert, --tls-key and --tls-ca go together")
    cert, key, ca = (path.read_bytes() for path in paths)  # type: ignore[union-attr]
    return TlsFiles(cert, key, ca)


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
    try:
        tls = _tls_files(config)
    except OSError as exc:
        raise OSError(f"cannot read TLS material: {exc}") from None
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
        tls=tls,
        allow=config.peer_allow,
        on_ready=ready,
        listen_address=listen,
    )
    node.add_consumer(driver.consume)
    node.sync = driver
    sync_server = None
    if listen:
        sync_server = grpc.aio.server(options=SERVER_OPTIONS)
        sync_pb2_grpc.add_SyncServiceServicer_to_server(driver, sync_server)
        try:
            if tls is None:
                port = sync_server.add_insecure_port(listen)
            else:
                port = sync_server.add_secure_port(listen, tls.server())
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
    if config.admin_token_file is not None and not os.access(config.admin_token_file, os.R_OK):
        print(f"{PROG}: {config.admin_token_file}: cannot read token file", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format=f"{PROG}: %(message)s",
        stream=sys.stderr,
    )
    try:
        return asyncio.run(serve(config, exit_after_replay))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
