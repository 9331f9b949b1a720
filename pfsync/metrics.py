"""``--metrics ADDR``: the node's counters in Prometheus text format.

A custom collector (:class:`NodeCollector`) reads the counters the table, the packet
sources and the pfsync engine keep anyway, at scrape time: nothing is done per packet.
The figures are the sysctl tree's (``net.pf.stats``, ``net.inet.*.stats``,
``net.interfaces.*``, ``kern.pool.*``, ``net.inet.pfsync.stats``), so pfnetstat and a
scrape never disagree.

The HTTP endpoint is a small asyncio server on the node's own event loop, not
prometheus_client's thread: a scrape then reads the counters between two packets, never
while a dict it walks is being changed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from pfsync.sync.engine import LAG_BUCKETS_MS
from statetable.counters import PFRES_NAMES
from statetable.mslt import CLASS_NAMES

if TYPE_CHECKING:
    from pfsync.node import Node
    from pfsync.sync.engine import SyncEngine

log = logging.getLogger("pfsyncd")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST = 8192


def _fields(node: Node, name: str) -> dict[str, int]:
    """A struct sysctl node's fields."""
    _, value = node.sysctl.get(name)
    return dict(value)  # type: ignore[arg-type]


def _below(node: Node, prefix: str) -> list[tuple[str, dict[str, int]]]:
    """(name below ``prefix``, fields) of the struct nodes under ``prefix``."""
    return [
        (n.name.removeprefix(prefix + "."), dict(n.get()))  # type: ignore[arg-type]
        for n in node.sysctl.list(prefix)
    ]


class NodeCollector(Collector):
    """Prometheus metrics of one node, read at scrape time."""

    def __init__(self, node: Node, engine: SyncEngine | None = None) -> None:
        self.node = node
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        table = self.node.table
        packets = CounterMetricFamily("pf_packets", "Packets by pf verdict", labels=["verdict"])
        packets.add_metric(["pass"], table.passed)
        packets.add_metric(["block"], table.blocked)
        yield packets
        reasons = CounterMetricFamily("pf_reason", "pf reason counters (PFRES)", labels=["reason"])
        for name, value in zip(PFRES_NAMES, table.pfres, strict=True):
            reasons.add_metric([name], value)
        yield reasons
        ops = CounterMetricFamily("pf_state_operations", "State table operations", labels=["op"])
        for op, value in zip(("search", "insert", "removal"), table.fcounters, strict=True):
            ops.add_metric([op], value)
        yield ops
        yield GaugeMetricFamily("pf_states", "States in the table", value=table.count)
        yield GaugeMetricFamily(
            "pf_states_limit", "Hard limit of the state table", value=table.limit_states
        )
        yield GaugeMetricFamily(
            "pf_states_half_open", "Half-open TCP states", value=table.half_open
        )
        tcp = CounterMetricFamily(
            "pf_tcp_events", "TCP connection events (net.inet.tcp.stats)", labels=["event"]
        )
        for name, value in table.stats.items("tcp"):
            tcp.add_metric([name], value)
        yield tcp
        yield from self._vtw()
        yield from self._interfaces()
        yield from self._pools()
        if self.engine is not None:
            yield from self._sync(self.engine)

    def _vtw(self) -> Iterator[Metric]:
        vtw = self.node.table.vtw
        events = CounterMetricFamily("vtw_events", "VTW inserts, deletes, kills", labels=["event"])
        events.add_metric(["insert"], vtw.stats.ins)
        events.add_metric(["delete"], vtw.stats.dels)
        events.add_metric(["assassination"], vtw.stats.kill)
        yield events
        records = GaugeMetricFamily(
            "vtw_records", "Vestigial TIME_WAIT records per pool", labels=["family", "class"]
        )
        for (af, cls), pool in sorted(vtw.pools.items()):
            records.add_metric([f"ipv{af}", CLASS_NAMES[cls]], pool.live)
        yield records

    def _interfaces(self) -> Iterator[Metric]:
        labels = ["interface", "direction"]
        packets = CounterMetricFamily("interface_packets", "Frames per interface", labels=labels)
        nbytes = CounterMetricFamily("interface_bytes", "Bytes per interface", labels=labels)
        errors = CounterMetricFamily("interface_errors", "Errors per interface", labels=labels)
        drops = CounterMetricFamily(
            "interface_drops", "Frames pf blocked per interface", labels=["interface"]
        )
        for name, f in _below(self.node, "net.interfaces"):
            for direction, prefix in (("in", "i"), ("out", "o")):
                packets.add_metric([name, direction], f.get(f"{prefix}packets", 0))
                nbytes.add_metric([name, direction], f.get(f"{prefix}bytes", 0))
                errors.add_metric([name, direction], f.get(f"{prefix}errors", 0))
            drops.add_metric([name], f.get("drops", 0))
        yield from (packets, nbytes, errors, drops)

    def _pools(self) -> Iterator[Metric]:
        inuse = GaugeMetricFamily("pool_inuse", "Objects in use by owner", labels=["owner"])
        nbytes = GaugeMetricFamily("pool_bytes", "Bytes by owner", labels=["owner"])
        peak = GaugeMetricFamily("pool_peak", "Most objects in use seen", labels=["owner"])
        for owner, f in _below(self.node, "kern.pool"):
            inuse.add_metric([owner], f.get("inuse", 0))
            nbytes.add_metric([owner], f.get("bytes", 0))
            peak.add_metric([owner], f.get("peak", 0))
        yield from (inuse, nbytes, peak)

    def _sync(self, engine: SyncEngine) -> Iterator[Metric]:
        stats = CounterMetricFamily(
            "pfsync_stats", "pfsync counters (netstat -s -p pfsync)", labels=["counter"]
        )
        for name, value in engine.stats.counters.items():
            stats.add_metric([name], value)
        yield stats
        labels = ["peer", "direction"]
        frames = CounterMetricFamily("pfsync_peer_frames", "Frames per peer", labels=labels)
        nbytes = CounterMetricFamily("pfsync_peer_bytes", "Bytes per peer", labels=labels)
        states = CounterMetricFamily("pfsync_peer_states", "States per peer", labels=labels)
        connected = GaugeMetricFamily("pfsync_peer_connected", "Peer up (1)", labels=["peer"])
        lag = HistogramMetricFamily(
            "pfsync_lag_ms",
            "Milliseconds from a change to the peer's acknowledgement of its frame",
            labels=["peer"],
        )
        for name, link in sorted(engine.peers.items()):
            for direction, f, b, s in (
                ("in", link.frames_in, link.bytes_in, link.states_in),
                ("out", link.frames_out, link.bytes_out, link.states_out),
            ):
                frames.add_metric([name, direction], f)
                nbytes.add_metric([name, direction], b)
                states.add_metric([name, direction], s)
            connected.add_metric([name], int(link.connected))
            cumulative, buckets = 0, []
            for bound, n in zip((*LAG_BUCKETS_MS, float("inf")), link.lag_ms, strict=True):
                cumulative += n
                buckets.append(("+Inf" if bound == float("inf") else f"{bound:g}", cumulative))
            # The engine keeps bucket counts only; the sum is not known.
            lag.add_metric([name], buckets, sum_value=None)
        yield from (frames, nbytes, states, connected, lag)


def registry_for(node: Node, engine: SyncEngine | None = None) -> CollectorRegistry:
    """A registry holding only the node's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node, engine))
    return registry


async def serve_metrics(address: str, registry: CollectorRegistry) -> asyncio.Server:
    """Serve ``GET /metrics`` (and ``/``) on ``HOST:PORT``; other paths get 404."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
            request = head[:MAX_REQUEST].split(b"\r\n", 1)[0].decode("latin-1").split()
            path = request[1] if len(request) >= 2 else ""
            if (
                len(request) >= 2
                and request[0] == "GET"
                and path.split("?")[0]
                in (
                    "/metrics",
                    "/",
                )
            ):
                body, status = generate_latest(registry), "200 OK"
            else:
                body, status = b"not found\n", "404 Not Found"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {CONTENT_TYPE}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, int(port), limit=MAX_REQUEST)
