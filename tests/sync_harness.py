"""Two (or more) pfsync engines wired together in memory, as aioquic's tests do.

Each node is a real StateTable fed real frames (tests/packets.py) and a real SyncEngine;
``transfer`` moves every frame each engine wants to send to its peers, serialized and
parsed again exactly as the gRPC adapter does, until nothing moves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pfsync.sync.engine import SyncEngine, SyncSettings
from pfsync.v1 import sync_pb2 as pb
from statetable import StateTable, TableConfig, decode_frame
from statetable import timeouts as tmo
from statetable.state import State


@dataclass
class SimNode:
    """A table and its engine; peers are named by the other node's name."""

    name: str
    table: StateTable
    engine: SyncEngine
    links: dict[str, str] = field(default_factory=dict)  # peer node -> link name here

    def feed(self, frame: bytes, now: float) -> int:
        """Track one Ethernet frame and hand the changes to the engine."""
        pkt = decode_frame(frame, 1)
        assert type(pkt) is tuple
        verdict = self.table.test(pkt, now)
        self.changes(now)
        return verdict

    def changes(self, now: float) -> None:
        """Give the engine what the table recorded."""
        self.engine.handle_changes(self.table.take_changes(), now)


def make_node(name: str, hostid: int, now: float = 0.0, **settings: object) -> SimNode:
    """A node with its own hostid; the table records changes for its engine."""
    table = StateTable(TableConfig(hostid=hostid, id_base=hostid << 32))
    table.record_changes()
    engine = SyncEngine(table, SyncSettings(**settings), epoch=hostid * 1000 + 1)  # type: ignore[arg-type]
    return SimNode(name, table, engine)


def connect(a: SimNode, b: SimNode, now: float = 0.0) -> None:
    """``a`` dials ``b``: a configured peer on a, an inbound one on b."""
    a.links[b.name] = f"to-{b.name}"
    b.links[a.name] = f"from-{a.name}"
    a.engine.add_peer(a.links[b.name], now)
    a.engine.peer_up(a.links[b.name], now)
    b.engine.peer_up(b.links[a.name], now)


def disconnect(a: SimNode, b: SimNode, now: float = 0.0) -> None:
    """Cut the stream between ``a`` and ``b``."""
    a.engine.peer_down(a.links[b.name], now)
    b.engine.peer_down(b.links[a.name], now)


def transfer(nodes: list[SimNode], now: float, rounds: int = 1000) -> int:
    """Deliver frames until every engine is quiet; returns how many frames moved."""
    moved = 0
    by_name = {n.name: n for n in nodes}
    for _ in range(rounds):
        progress = 0
        for node in nodes:
            node.engine.handle_timer(now)
            for peer_name, link in node.links.items():
                peer = by_name.get(peer_name)
                if peer is None or node.name not in peer.links:
                    continue
                for frame in node.engine.frames_to_send(link, now):
                    data = frame.SerializeToString()
                    peer.engine.receive(
                        peer.links[node.name], pb.SyncFrame.FromString(data), now, len(data)
                    )
                    peer.changes(now)
                    progress += 1
        moved += progress
        if not progress:
            return moved
    raise AssertionError("engines never went quiet")


def flush_all(nodes: list[SimNode], now: float) -> None:
    """Let flush_ms pass so pending changes leave, then deliver everything."""
    later = now + 1.0
    for node in nodes:
        node.engine.handle_timer(later)
    transfer(nodes, later)


def snapshot(table: StateTable) -> dict[tuple[int, int], tuple[object, ...]]:
    """What must agree between synced tables: identity, key, protocol, peers, timeout."""
    out: dict[tuple[int, int], tuple[object, ...]] = {}
    for st in list(table.states()) + list(table.time_wait_states()):
        out[(st.id, st.creatorid)] = (
            st.key,
            st.proto,
            _peer(st),
            _peer(st.dst),
            tmo.TIME_WAIT if st.timeout == tmo.TIME_WAIT else st.timeout,
        )
    return out


def _peer(p: State | object) -> tuple[int, ...]:
    return (p.state, p.seqlo, p.seqhi, p.max_win, p.wscale)  # type: ignore[attr-defined]
