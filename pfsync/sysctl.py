"""The node's sysctl tree: typed, named knobs and statistics (BSD sysctl(3) style).

Each node is a :class:`SysctlNode` with a getter and, when writable, a setter that
receives an already parsed and range-checked value. Knobs and statistics of later
features only add nodes (``tree.add(...)``); the gRPC service, ``pfsysctl``, the
``--sysctl`` flag and the config file's ``[sysctl]`` table all go through
:meth:`SysctlTree.set`, so a value is checked the same way wherever it comes from.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import annotated_types
from pydantic import BaseModel

from pfsync.sync.engine import LAG_BUCKETS_MS, SyncEngine, SyncSettings
from statetable import timeouts as tmo
from statetable.mslt import CLASS_NAMES, MSL_MAX, Mslt
from statetable.table import LIMIT_STATES_MAX, LIMIT_STATES_MIN, StateTable
from statetable.vtw import ENTRIES_MAX, ENTRIES_MIN, HashStats

if TYPE_CHECKING:
    from pfsync.node import Node
    from pfsync.taps import TapHub

Value = int | bool | str | list[tuple[str, int]]

# An integer value longer than this is not echoed whole in an error message.
MAX_ECHO = 40


class Kind(enum.Enum):
    """A node's type (the wire enum's names)."""

    INT = "int"
    BOOL = "bool"
    STRING = "string"
    STRUCT = "struct"


class SysctlError(Exception):
    """A name or value the tree refuses; ``code`` says which kind, the message is one line."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code  # "not-found", "invalid" or "read-only"


@dataclass(frozen=True)
class SysctlNode:
    """One named value of the tree."""

    name: str
    kind: Kind
    description: str
    get: Callable[[], Value]
    # Receives what parse() returns: writable nodes are INT or BOOL.
    set: Callable[[int | bool], None] | None = None
    minimum: int | None = None
    maximum: int | None = None
    power_of_two: bool = False
    # Readable by admins only (net.bpf.peers: who taps what, as netstat -B is root's).
    private: bool = False

    @property
    def writable(self) -> bool:
        """Whether ``set`` may change it."""
        return self.set is not None

    def parse(self, text: str) -> int | bool:
        """A value for this node from text, range-checked; SysctlError if unusable."""
        text = text.strip()
        shown = text if len(text) <= MAX_ECHO else text[:MAX_ECHO] + "..."
        if self.kind is Kind.BOOL:
            lowered = text.lower()
            if lowered in ("1", "true", "on", "yes"):
                return True
            if lowered in ("0", "false", "off", "no"):
                return False
            raise SysctlError("invalid", f"{self.name}: {shown!r} is not 0 or 1")
        if self.kind is not Kind.INT:
            raise SysctlError("read-only", f"{self.name} is read-only")
        # int() also takes Arabic-Indic and other Unicode digits and "1_000": ASCII only.
        digits = text.removeprefix("-").removeprefix("+")
        try:
            if not (digits.isascii() and digits.replace("x", "").replace("X", "").isalnum()):
                raise ValueError
            value = int(text, 0)
        except ValueError:
            raise SysctlError("invalid", f"{self.name}: {shown!r} is not an integer") from None
        if (
            self.minimum is not None
            and value < self.minimum
            or self.maximum is not None
            and value > self.maximum
        ):
            raise SysctlError(
                "invalid", f"{self.name}: {shown} is out of range {self.minimum}..{self.maximum}"
            )
        if self.power_of_two and value & (value - 1):
            raise SysctlError("invalid", f"{self.name}: {value} is not a power of two")
        return value


def struct_value(node: SysctlNode) -> list[tuple[str, int]]:
    """The (field, value) pairs of a STRUCT node."""
    value = node.get()
    if not isinstance(value, list):
        raise SysctlError("invalid", f"{node.name} is not a struct")
    return value


def _set_timeout(table: StateTable, timeout: int, value: int | bool) -> None:
    table.set_timeout(timeout, int(value))


def _mslt_value(mslt: Mslt, field: str) -> int | bool:
    value: int | bool = getattr(mslt.config, field)  # the config is replaced when set
    return value


def _set_mslt(table: StateTable, field: str, value: int | bool) -> None:
    table.set_mslt(**{field: int(value)})


class SysctlTree:
    """Nodes by name, with BSD's lookup rules (exact name, subtree prefix, struct field)."""

    def __init__(self) -> None:
        self._nodes: dict[str, SysctlNode] = {}

    def add(self, node: SysctlNode) -> None:
        """Register a node; names are unique and no node may sit below another."""
        if node.name in self._nodes or any(
            n.startswith(node.name + ".") or node.name.startswith(n + ".") for n in self._nodes
        ):
            raise ValueError(f"sysctl {node.name} clashes with an existing node")
        self._nodes[node.name] = node

    def node(self, name: str) -> SysctlNode:
        """The node with exactly this name."""
        node = self._nodes.get(name)
        if node is None:
            raise SysctlError("not-found", f"unknown sysctl name {name!r}")
        return node

    def list(self, prefix: str = "") -> list[SysctlNode]:
        """Nodes named ``prefix`` or below it, sorted; all nodes for an empty prefix."""
        if not prefix:
            return sorted(self._nodes.values(), key=lambda n: n.name)
        found = [
            n for name, n in self._nodes.items() if name == prefix or name.startswith(prefix + ".")
        ]
        if not found:
            raise SysctlError("not-found", f"unknown sysctl name {prefix!r}")
        return sorted(found, key=lambda n: n.name)

    def get(self, name: str) -> tuple[SysctlNode, Value]:
        """(node, value) for a node name, or for ``STRUCTNAME.FIELD`` (then the field's
        value, as an INT)."""
        node = self._nodes.get(name)
        if node is not None:
            return node, node.get()
        head, _, tail = name.rpartition(".")
        while head:
            parent = self._nodes.get(head)
            if parent is not None and parent.kind is Kind.STRUCT:
                fields: list[tuple[str, int]] = [
                    (f, v) for f, v in struct_value(parent) if f == tail or f.startswith(tail + ".")
                ]
                if fields:
                    return parent, fields
                break
            head, _, rest = head.rpartition(".")
            tail = f"{rest}.{tail}"
        raise SysctlError("not-found", f"unknown sysctl name {name!r}")

    def set(self, name: str, text: str) -> tuple[Value, Value]:
        """Parse and apply a value; returns (old, new)."""
        node = self.node(name)
        if node.set is None:
            raise SysctlError("read-only", f"{name} is read-only")
        value = node.parse(text)
        old = node.get()
        node.set(value)
        return old, node.get()


def _hash_fields(prefix: str, stats: HashStats) -> list[tuple[str, int]]:
    return [(f"{prefix}.{name}", value) for name, value in stats.items()]


def build_tree(node: Node) -> SysctlTree:
    """The tree of a node: VTW, MSLT, pf timeouts and limits."""
    table = node.table
    vtw, mslt = table.vtw, table.mslt
    tree = SysctlTree()

    def vtw_stats() -> list[tuple[str, int]]:
        s = vtw.stats
        fields = [("ins", s.ins), ("del", s.dels), ("kill", s.kill)]
        fields += _hash_fields("lookup_connect", s.connect) + _hash_fields("lookup_port", s.port)
        for af in (4, 6):
            for cls, cname in enumerate(CLASS_NAMES):
                pool = vtw.pools.get((af, cls))
                inuse, free, nbytes = (
                    (pool.live, pool.capacity - pool.live, pool.nbytes)
                    if pool is not None
                    else (0, vtw.entries - 1, 0)
                )
                base = f"class.ipv{af}.{cname}"
                fields += [
                    (f"{base}.inuse", inuse),
                    (f"{base}.free", free),
                    (f"{base}.bytes", nbytes),
                ]
        return fields

    tree.add(
        SysctlNode(
            "net.inet.tcp.vtw.enable",
            Kind.BOOL,
            "keep TIME_WAIT connections as compact vestigial records (0/1)",
            lambda: vtw.enabled,
            lambda v: table.set_vtw_enabled(bool(v)),
        )
    )
    tree.add(
        SysctlNode(
            "net.inet.tcp.vtw.entries",
            Kind.INT,
            "slots per VTW pool (one pool per family and MSLT class; power of two, "
            f"{ENTRIES_MIN}..{ENTRIES_MAX})",
            lambda: vtw.entries,
            lambda v: table.set_vtw_entries(int(v)),
            minimum=ENTRIES_MIN,
            maximum=ENTRIES_MAX,
            power_of_two=True,
        )
    )
    tree.add(
        SysctlNode(
            "net.inet.tcp.vtw.stats",
            Kind.STRUCT,
            "VTW inserts, deletes, assassinations, hash lookups, pool usage",
            vtw_stats,
        )
    )
    tree.add(
        SysctlNode(
            "net.inet.tcp.mslt.enable",
            Kind.BOOL,
            "MSL by peer nearness (loopback/local/remote); 0: remote MSL for all",
            lambda: mslt.config.enable,
            lambda v: table.set_mslt(enable=bool(v)),
        )
    )
    for field, text in (
        ("loopback", "loopback connections"),
        ("local", "connections within the local networks"),
        ("remote", "other connections"),
    ):
        tree.add(
            SysctlNode(
                f"net.inet.tcp.mslt.{field}",
                Kind.INT,
                f"MSL in seconds of {text} (TIME_WAIT lasts 2 x MSL), 0..{MSL_MAX}",
                partial(_mslt_value, mslt, field),
                partial(_set_mslt, table, field),
                minimum=0,
                maximum=MSL_MAX,
            )
        )
    tree.add(
        SysctlNode(
            "net.inet.tcp.mslt.local_nets",
            Kind.STRING,
            "networks MSLT counts as local (--local-net)",
            lambda: " ".join(str(n) for n in mslt.local_nets),
        )
    )
    for i, name in enumerate(tmo.NAMES):
        unit = "states" if name.startswith("adaptive.") else "seconds"
        tree.add(
            SysctlNode(
                f"net.pf.timeout.{name}",
                Kind.INT,
                f"pf timeout {name} in {unit}",
                partial(table.timeouts.__getitem__, i),
                partial(_set_timeout, table, i),
                minimum=0,
                maximum=tmo.TIMEOUT_MAX,
            )
        )
    tree.add(
        SysctlNode(
            "net.pf.limit.states",
            Kind.INT,
            "hard limit of the state table",
            lambda: table.limit_states,
            lambda v: table.set_limit_states(int(v)),
            minimum=LIMIT_STATES_MIN,
            maximum=LIMIT_STATES_MAX,
        )
    )
    return tree


def model_range(model: type[BaseModel], field: str) -> tuple[int | None, int | None]:
    """(minimum, maximum) a pydantic model allows for ``field``: the one place a knob's
    range is written, read back for its sysctl node."""
    low = high = None
    for meta in model.model_fields[field].metadata:
        if isinstance(meta, annotated_types.Ge):
            low = int(meta.ge)  # type: ignore[call-overload]
        elif isinstance(meta, annotated_types.Gt):
            low = int(meta.gt) + 1  # type: ignore[call-overload]
        elif isinstance(meta, annotated_types.Le):
            high = int(meta.le)  # type: ignore[call-overload]
        elif isinstance(meta, annotated_types.Lt):
            high = int(meta.lt) - 1  # type: ignore[call-overload]
    return low, high


def add_sync_nodes(tree: SysctlTree, engine: SyncEngine) -> None:
    """net.pfsync.* knobs and net.inet.pfsync.stats, for a node that syncs."""
    settings = engine.settings

    def setter(field: str) -> Callable[[int | bool], None]:
        def apply(value: int | bool) -> None:
            setattr(settings, field, value)
            if field == "replay_log":
                engine.log.resize(int(value))

        return apply

    for field, kind, text in (
        ("maxupd", Kind.INT, "updates of a TCP state coalesced before its frame leaves"),
        ("flush_ms", Kind.INT, "longest a change waits for more before its frame leaves (ms)"),
        ("defer", Kind.BOOL, "hold a new state's first packet until a peer acknowledges it"),
        ("replay_log", Kind.INT, "frames kept for peers that reconnect (resume, not resend)"),
        ("frame_states", Kind.INT, "states a frame carries before it leaves (1: one per frame)"),
    ):
        low, high = model_range(SyncSettings, field) if kind is Kind.INT else (None, None)
        tree.add(
            SysctlNode(
                f"net.pfsync.{field}",
                kind,
                text + (f", {low}..{high}" if kind is Kind.INT else " (0/1)"),
                lambda field=field: getattr(settings, field),  # type: ignore[misc]
                setter(field),
                minimum=low,
                maximum=high,
            )
        )
    tree.add(
        SysctlNode(
            "net.inet.pfsync.stats",
            Kind.STRUCT,
            "pfsync counters (netstat -s -p pfsync order), actions in/out, peers, lag",
            lambda: sync_stats(engine),
        )
    )


def sync_stats(engine: SyncEngine) -> list[tuple[str, int]]:
    """The fields of net.inet.pfsync.stats."""
    s = engine.stats
    fields = list(s.counters.items())
    fields += [(f"input.{name}", n) for name, n in s.actions_in.items()]
    fields += [(f"output.{name}", n) for name, n in s.actions_out.items()]
    fields += [
        ("replay_log.hits", engine.log.hits),
        ("replay_log.misses", engine.log.misses),
        ("bulk_fallbacks", s.bulk_fallbacks),
        ("digest_mismatches", s.digest_mismatches),
        ("repairs", s.repairs),
        ("deferred", s.deferred),
        ("defer_timeouts", s.defer_timeouts),
    ]
    lag = [0] * (len(LAG_BUCKETS_MS) + 1)
    for i, link in enumerate(sorted(engine.peers.values(), key=lambda p: p.name)):
        base = f"peer.{i}"
        fields += [
            (f"{base}.connected", int(link.connected)),
            (f"{base}.creatorid", link.creatorid or 0),
            (f"{base}.frames_in", link.frames_in),
            (f"{base}.frames_out", link.frames_out),
            (f"{base}.bytes_in", link.bytes_in),
            (f"{base}.bytes_out", link.bytes_out),
            (f"{base}.states_in", link.states_in),
            (f"{base}.states_out", link.states_out),
        ]
        lag = [a + b for a, b in zip(lag, link.lag_ms, strict=True)]
    bounds = [f"le_{int(b)}ms" for b in LAG_BUCKETS_MS] + ["inf"]
    fields += [(f"lag.{bound}", n) for bound, n in zip(bounds, lag, strict=True)]
    return fields


def add_bpf_nodes(tree: SysctlTree, hub: TapHub) -> None:
    """net.bpf.stats (tap totals, open to all) and net.bpf.peers (each tap, admins only)."""
    tree.add(
        SysctlNode(
            "net.bpf.stats",
            Kind.STRUCT,
            "taps: frames received, captured (matched the filter) and dropped (buffer "
            "full) by every tap since start; taps attached now (peers) and ever; "
            "refused attach/list calls (denied)",
            hub.stats,
        )
    )
    tree.add(
        SysctlNode(
            "net.bpf.peers",
            Kind.STRING,
            "attached taps, one per line: id pid comm if flags recv drop capt bufsize "
            "buffered peer as key=value, then filter=EXPR to the end of the line (admin only)",
            hub.peers_text,
            private=True,
        )
    )
