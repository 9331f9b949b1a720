"""The pfsync engine: table changes in, frames out; peers' frames in, table changes made.

Sans-I/O, in the shape of aioquic's connection: no sockets, no clock, no asyncio. The
node (:mod:`pfsync.sync.peer` is the gRPC shell) feeds it

- ``handle_changes(changes, now)``: what the table recorded since the last call;
- ``peer_up(name, now)`` / ``peer_down(name, now)``: a stream to a peer opened or closed;
- ``receive(name, frame, now)``: a frame a peer sent;
- ``handle_timer(now)`` when ``next_timer()`` is due;

and sends what ``frames_to_send(name, now)`` returns. What belongs here is pfsync's
behaviour (REFERENCE.md section 3 of the project notes, carried over from OpenBSD):

Output. One pending message per state, shared by all peers (pfsync multicasts): a new
state is an INS, later packets turn nothing into an UPD_C (its content is read when the
frame is built, so ten updates cost one message), a removal cancels a pending INS or
becomes a DEL_C, a flush becomes one CLR per creator. A TCP state's update forces the
frame out after ``maxupd`` updates, or at once when a peer changed that state within the
last 2 s (both nodes see its traffic); otherwise frames leave when ``frame_states``
states are pending or ``flush_ms`` after the first change. Changes that came from a peer
(``Origin.PEER``) are never sent: nothing echoes. NOSYNC states are never sent.

Sequencing and resumption. Shared frames are numbered per sender epoch and kept in a
bounded replay log. A reconnecting peer says (hello) the last one it applied; the
missing frames are resent from the log, and only a gap larger than the log costs a bulk
update. Replies to one peer (stale corrections, answers to UPD_REQ, INS_ACKs, bulk
content, digests) are unnumbered.

Input. Frames are validated column by column (``badlen``, ``badval``; an action this
version does not know: ``badact``); states are applied through the table's peer API,
which keeps every count and index right and implements pfsync's stale rule; a stale
update is answered with our copy (self-healing), an UPD_C for an unknown state with an
UPD_REQ. A node is *ready* (may take over traffic) once a peer finished a bulk update
for it, or after 12 requests 2 s apart went unanswered, or at once without peers.

Beyond pfsync: table digests exchanged every ``digest_interval`` seconds; a mismatch
seen while neither side has frames in flight, three times in a row, repairs itself with
a bulk update (at most once per ``repair_holdoff``).
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from google.protobuf.unknown_fields import UnknownFieldSet
from pydantic import BaseModel, Field

from pfsync.sync import wire
from pfsync.sync.digest import Digest, state_hash
from pfsync.sync.replaylog import ReplayLog
from pfsync.v1 import sync_pb2 as pb
from statetable import timeouts as tmo
from statetable.events import (
    Origin,
    RemoveReason,
    StateInserted,
    StateMoved,
    StateRemoved,
    StateUpdated,
    StateVestigial,
    VestigialRemoved,
)
from statetable.state import FLAG_NOSYNC, State
from statetable.table import APPLIED, FAILED, STALE, UNKNOWN, StateTable

log = logging.getLogger("pfsyncd.sync")

VERSION = 1
# pfsync: a bulk request is retried every 2 s, 12 times, then the node stops waiting.
BULK_RETRY_SECONDS = 2.0
BULK_ATTEMPTS = 12
# An update of a state a peer changed this recently is sent at once (pfsync_time).
PEER_RECENT_SECONDS = 2.0
# Deferral: a held packet is released after this long without an INS_ACK.
DEFER_SECONDS = 0.020
DEFER_MAX = 128
# Digest mismatches in a row before a repair.
DIGEST_STRIKES = 3
# Frames queued to one peer before it is cut (it resumes from the log or a bulk later).
OUTBOX_LIMIT = 8192

# Pending message kinds (low two bits) and the update counter above them.
_INS, _UPD, _UPD_C = 1, 2, 3
_KIND = 3
_COUNT = 4

# pfsync's statistics, in netstat's order (REFERENCE.md section 3).
STAT_NAMES: tuple[str, ...] = (
    "ipackets",
    "ipackets6",
    "badif",
    "badttl",
    "hdrops",
    "badver",
    "badact",
    "badlen",
    "badauth",
    "stale",
    "badval",
    "badstate",
    "opackets",
    "opackets6",
    "onomem",
    "oerrors",
)
# Action names for the per-action input/output histograms (pfsync's numbers + ours).
ACTION_NAMES: tuple[str, ...] = (
    "clr",
    "ins",
    "ins_ack",
    "upd",
    "upd_c",
    "upd_req",
    "del_c",
    "bus",
    "vtw",
    "hello",
    "digest",
)
# Replication lag histogram bucket upper bounds, milliseconds.
LAG_BUCKETS_MS: tuple[float, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class SyncSettings(BaseModel):
    """The net.pfsync.* knobs (validated: they come from flags, files and the API)."""

    maxupd: int = Field(128, ge=0, le=255)
    flush_ms: int = Field(10, ge=1, le=1000)
    defer: bool = False
    replay_log: int = Field(4096, ge=1, le=1 << 20)
    frame_states: int = Field(1024, ge=1, le=20000)
    bulk_states: int = Field(4096, ge=1, le=20000)
    digest_interval: float = Field(3.0, gt=0)
    repair_holdoff: float = Field(30.0, ge=0)


class SyncStats:
    """pfsync's 16 counters and the per-action histograms."""

    def __init__(self) -> None:
        self.counters: dict[str, int] = dict.fromkeys(STAT_NAMES, 0)
        self.actions_in: dict[str, int] = dict.fromkeys(ACTION_NAMES, 0)
        self.actions_out: dict[str, int] = dict.fromkeys(ACTION_NAMES, 0)
        self.digest_mismatches = 0
        self.repairs = 0
        self.bulk_fallbacks = 0
        self.deferred = 0
        self.defer_timeouts = 0

    def count(self, name: str, n: int = 1) -> None:
        """Add to one of the 16 counters."""
        self.counters[name] += n


@dataclass
class PeerLink:
    """What the engine knows of one peer stream."""

    name: str
    v6: bool = False
    configured: bool = False
    connected: bool = False
    hello_sent: bool = False
    hello_received: bool = False
    # From the peer's hello: its hostid and epoch; what we applied of its frames.
    creatorid: int | None = None
    epoch: int = 0
    applied: int = 0
    # Where this stream resumes the peer's frames (said in our hello): (0, 0) = fresh.
    resume_epoch: int = 0
    resume_sequence: int = 0
    # The highest of our sequences the peer acknowledged.
    acked: int = 0
    # We applied a numbered frame of the peer's and owe it an acknowledgement.
    ack_owed: bool = False
    # When the last acknowledgement alone went out.
    ack_alone_at: float = float("-inf")
    outbox: deque[pb.SyncFrame] = field(default_factory=deque)
    # Per-peer replies, flushed with the next frames_to_send.
    reply_full: dict[tuple[int, int], State] = field(default_factory=dict)
    reply_requests: dict[tuple[int, int], None] = field(default_factory=dict)
    reply_acks: list[tuple[int, int]] = field(default_factory=list)
    bulk_out: Iterator[list[State]] | None = None
    # Our sequence when the last bulk update to this peer began: the bulk carries every
    # change up to it, though the peer applied none of those frames (its ack stays lower).
    bulk_covers: int = 0
    bulk_in: bool = False
    bulk_received: int = 0
    digest_strikes: int = 0
    peer_digest: int | None = None
    digest_agrees: bool = False
    last_repair: float = float("-inf")
    next_digest: float = 0.0
    # Figures for pfctl -s sync.
    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    states_in: int = 0
    states_out: int = 0
    lag_ms: list[int] = field(default_factory=lambda: [0] * (len(LAG_BUCKETS_MS) + 1))
    last_error: str = ""
    superseded: bool = False

    def lag_percentile(self, q: float) -> float | None:
        """The bucket bound under which ``q`` of lag samples fell (ms), or None."""
        total = sum(self.lag_ms)
        if not total:
            return None
        seen = 0
        for i, n in enumerate(self.lag_ms):
            seen += n
            if seen >= q * total:
                return LAG_BUCKETS_MS[i] if i < len(LAG_BUCKETS_MS) else float("inf")
        return float("inf")


def _copy_time_wait(st: State, expire: float) -> State:
    """A detached copy of a state that entered TIME_WAIT, as a VTW action carries it.

    The original may still sit in the table's purge queue, so it is never modified.
    """
    cp = State(st.key, st.proto, st.id, st.creatorid, st.creation)
    cp.flags, cp.timeout, cp.expire, cp.traffic = st.flags, tmo.TIME_WAIT, expire, st.traffic
    for a, b in ((cp, st), (cp.dst, st.dst)):
        a.state, a.seqlo, a.seqhi, a.max_win, a.wscale = (
            b.state,
            b.seqlo,
            b.seqhi,
            b.max_win,
            b.wscale,
        )
    cp.dst.traffic = st.dst.traffic
    return cp


def _hash(st: State) -> int:
    return state_hash(st.id, st.creatorid, st.key, st.proto, st.state, st.dst.state)


class SyncEngine:
    """pfsync for one node: see the module doc."""

    def __init__(
        self,
        table: StateTable,
        settings: SyncSettings | None = None,
        epoch: int | None = None,
    ) -> None:
        self.table = table
        self.settings = settings or SyncSettings()
        self.hostid = table.hostid
        self.epoch = epoch if epoch is not None else random.getrandbits(63) | 1
        self.stats = SyncStats()
        self.digest = Digest()
        self.peers: dict[str, PeerLink] = {}
        # hostid -> (its epoch, its last frame we applied), for inbound peers' next stream.
        self._resume: dict[int, tuple[int, int]] = {}
        self.log = ReplayLog(self.settings.replay_log)
        self.sequence = 0
        # The shared output queue: State -> kind | count << 2, in insertion order.
        self._pending: dict[State, int] = {}
        self._pending_vtw: dict[tuple[int, int], State] = {}
        self._deletes: dict[tuple[int, int], None] = {}
        self._clears: dict[int, None] = {}
        self._ack_requests: dict[tuple[int, int], None] = {}
        self._first_change: float | None = None
        self._urgent = False
        # Frame sequence -> when its oldest change was made (for the lag figures).
        self._sent_at: deque[tuple[int, float]] = deque()
        # State -> last time a peer changed it (pfsync_time), pruned as it ages.
        self._peer_touched: dict[State, float] = {}
        self._next_prune = 0.0
        # Deferral: held new states -> release deadline; released ones await the node.
        self._deferred: dict[tuple[int, int], float] = {}
        self._released: list[tuple[int, int]] = []
        # Readiness: waiting for a bulk update from a peer.
        self.ready = True
        self.bulk_attempts = 0
        self._next_bulk_request: float | None = None
        self.bulk_gave_up = False

    def pending_changes(self) -> int:
        """State changes waiting for their frame (kern.pool.sync_pending)."""
        return len(self._pending) + len(self._pending_vtw) + len(self._deletes) + len(self._clears)

    # ---- peers -------------------------------------------------------------------------

    def add_peer(self, name: str, now: float, configured: bool = True, v6: bool = False) -> None:
        """Know a peer: a configured one makes this node wait for a bulk update."""
        link = self.peers.get(name)
        if link is None:
            link = self.peers[name] = PeerLink(name, v6=v6)
        link.configured = link.configured or configured
        if configured and self.ready and self.bulk_attempts == 0 and not self.bulk_gave_up:
            self.ready = False
            self._next_bulk_request = now

    def peer_up(self, name: str, now: float, v6: bool = False) -> None:
        """A stream to ``name`` opened: the next frames start with a hello."""
        if name not in self.peers:
            self.add_peer(name, now, configured=False, v6=v6)
        link = self.peers[name]
        link.connected, link.hello_sent, link.superseded = True, False, False
        link.hello_received = False
        link.resume_epoch, link.resume_sequence = link.epoch, link.applied
        link.outbox.clear()
        link.bulk_out = None
        link.bulk_covers = 0
        link.bulk_in = False
        link.next_digest = now + self.settings.digest_interval

    def peer_down(self, name: str, now: float, error: str = "") -> None:
        """A stream closed; what it had queued is dropped (resumption covers it).

        An inbound peer (one that dialed us) is forgotten; where to resume its frames is
        kept by its hostid for its next stream.
        """
        link = self.peers.get(name)
        if link is None:
            return
        if link.creatorid is not None and link.epoch:
            self._resume[link.creatorid] = (link.epoch, link.applied)
        link.connected = False
        link.outbox.clear()
        link.reply_full.clear()
        link.reply_requests.clear()
        link.reply_acks.clear()
        link.bulk_out = None
        link.bulk_in = False
        if error:
            link.last_error = error
        if not link.configured:
            del self.peers[name]

    def superseded(self, name: str) -> bool:
        """Whether ``name``'s stream lost to another stream to the same node: its dialer
        must not redial while that one is up (see :meth:`_hello_in`)."""
        link = self.peers.get(name)
        if link is None or not link.superseded or link.creatorid is None:
            return False
        return any(
            p.connected and p.creatorid == link.creatorid
            for p in self.peers.values()
            if p is not link
        )

    # ---- local changes -----------------------------------------------------------------

    def handle_changes(self, changes: Iterable[object], now: float) -> list[tuple[int, int]]:
        """Take the table's changes; returns the new states held for deferral."""
        pending = self._pending
        maxupd = self.settings.maxupd << 2
        deferred: list[tuple[int, int]] = []
        touched = self._peer_touched
        digest = self.digest
        for ch in changes:
            if type(ch) is StateUpdated:
                st = ch.state
                if st.flags & FLAG_NOSYNC:
                    continue
                if ch.old_src != ch.new_src or ch.old_dst != ch.new_dst:
                    sid, creator, key = st.id, st.creatorid, st.key
                    digest.replace(
                        state_hash(sid, creator, key, st.proto, ch.old_src, ch.old_dst),
                        state_hash(sid, creator, key, st.proto, ch.new_src, ch.new_dst),
                    )
                if ch.origin == Origin.PEER:
                    touched[st] = now
                    self._release(st.id, st.creatorid)
                    continue
                # A local transition (SYN|ACK, FIN, ...) is an update like any other
                # packet's: it counts towards maxupd, and leaves at once if a peer just
                # changed the state. On to the packet case below.
                ch = st
            if type(ch) is State:
                # The hot case: a packet moved windows/counters/expiry of a state.
                if ch.flags & FLAG_NOSYNC:
                    continue
                code = pending.get(ch)
                if code is None:
                    pending[ch] = _UPD_C | _COUNT
                    if self._first_change is None:
                        self._first_change = now
                elif ch.proto == 6:
                    code += _COUNT
                    pending[ch] = code
                    if code >= maxupd:
                        self._urgent = True
                if touched and ch in touched and now - touched[ch] < PEER_RECENT_SECONDS:
                    self._urgent = True
            elif type(ch) is StateInserted:
                st = ch.state
                if st.flags & FLAG_NOSYNC:
                    continue
                digest.add(
                    state_hash(st.id, st.creatorid, st.key, st.proto, ch.src_state, ch.dst_state)
                )
                if ch.origin == Origin.PEER:
                    touched[st] = now
                    continue
                pending[st] = _INS
                if self._first_change is None:
                    self._first_change = now
                if self.settings.defer and self._connected() and len(self._deferred) < DEFER_MAX:
                    ident = (st.id, st.creatorid)
                    self._deferred[ident] = now + DEFER_SECONDS
                    self._ack_requests[ident] = None
                    self.stats.deferred += 1
                    deferred.append(ident)
                    self._urgent = True
            elif type(ch) is StateRemoved:
                self._removed(ch.state, ch.reason, ch.origin, now)
            elif type(ch) is StateVestigial:
                st = ch.state
                if st.flags & FLAG_NOSYNC:
                    continue
                if ch.old_src != st.state or ch.old_dst != st.dst.state:
                    old = state_hash(st.id, st.creatorid, st.key, 6, ch.old_src, ch.old_dst)
                    digest.replace(old, _hash(st))
                touched.pop(st, None)
                pending.pop(st, None)
                if ch.origin == Origin.PEER:
                    continue
                self._pending_vtw[(st.id, st.creatorid)] = _copy_time_wait(st, ch.expire)
                if self._first_change is None:
                    self._first_change = now
            elif type(ch) is VestigialRemoved:
                ident = (ch.id, ch.creatorid)
                h = state_hash(ch.id, ch.creatorid, ch.key, 6, ch.src_state, ch.dst_state)
                digest.remove(h)
                self._pending_vtw.pop(ident, None)
                if ch.origin == Origin.PEER:
                    continue
                if ch.reason == RemoveReason.FLUSHED:
                    self._clears[ch.creatorid] = None
                else:
                    self._deletes[ident] = None
                if self._first_change is None:
                    self._first_change = now
            elif type(ch) is StateMoved:
                continue
        if self._must_flush(now):
            self._flush(now)
        return deferred

    def _removed(self, st: State, reason: RemoveReason, origin: Origin, now: float) -> None:
        if st.flags & FLAG_NOSYNC:
            return
        self.digest.remove(_hash(st))
        self._peer_touched.pop(st, None)
        code = self._pending.pop(st, None)
        ident = (st.id, st.creatorid)
        self._deferred.pop(ident, None)
        self._ack_requests.pop(ident, None)
        if origin == Origin.PEER:
            return
        if reason == RemoveReason.FLUSHED:
            self._clears[st.creatorid] = None
        elif code is not None and code & _KIND == _INS:
            return  # the peers never heard of it
        else:
            self._deletes[ident] = None
        if self._first_change is None:
            self._first_change = now

    def _connected(self) -> bool:
        return any(link.connected for link in self.peers.values())

    # ---- building frames ---------------------------------------------------------------

    def flush(self, now: float) -> None:
        """Send everything pending now (a node that stops does this last)."""
        if self._first_change is not None:
            self._flush(now)

    def _must_flush(self, now: float) -> bool:
        if self._first_change is None:
            return False
        if self._urgent:
            return True
        waiting = len(self._pending) + len(self._pending_vtw) + len(self._deletes)
        if waiting >= self.settings.frame_states:
            return True
        # The same sum next_timer() reports: ``now - first >= flush`` can be False at the
        # very time next_timer() gave (float rounding), and the timer would spin.
        return now >= self._first_change + self.settings.flush_ms / 1000

    def _flush(self, now: float) -> None:
        """Turn everything pending into numbered frames for every peer."""
        first = self._first_change if self._first_change is not None else now
        self._first_change = None
        self._urgent = False
        if not self.peers and not self._resume:
            # Nobody to tell, and nobody who may resume (a listener that had streams keeps
            # numbering and logging for their return). These changes are in no frame, so
            # the log must not claim to be complete: skip a sequence and empty the log, and
            # whoever resumes from before them gets a bulk update (a peer's hello would
            # otherwise be answered "nothing missed").
            self.sequence += 1
            self.log.clear()
            self._pending.clear()
            self._pending_vtw.clear()
            self._deletes.clear()
            self._clears.clear()
            self._ack_requests.clear()
            return
        budget = self.settings.frame_states
        pending = list(self._pending.items())
        self._pending.clear()
        vtw = list(self._pending_vtw.values())
        self._pending_vtw.clear()
        deletes = list(self._deletes)
        self._deletes.clear()
        clears = list(self._clears)
        self._clears.clear()
        acks = self._ack_requests
        self._ack_requests = {}
        if not (pending or vtw or deletes or clears):
            return  # what was pending cancelled out (an INS removed before the flush)
        timeouts = self.table.timeouts
        out = self.stats.actions_out
        while True:
            frame = pb.SyncFrame(sender=self.hostid)
            if clears:
                frame.clear.extend(clears)
                out["clr"] += len(clears)
                clears = []
            # Deletes first: a removed state's key may already belong to a new state of
            # this flush (a SYN reusing a closed connection's ports); inserted ahead of
            # the delete, the peer found the key taken and dropped the new state.
            room = budget
            if deletes:
                part_ids, deletes = deletes[:room], deletes[room:]
                wire.put_ids(frame.deletes, part_ids)
                out["del_c"] += len(part_ids)
                room -= len(part_ids)
            chunk, pending = pending[:room], pending[room:]
            room -= len(chunk)
            ins = [st for st, code in chunk if code & _KIND == _INS]
            upd = [st for st, code in chunk if code & _KIND == _UPD]
            updc = [st for st, code in chunk if code & _KIND == _UPD_C]
            if ins:
                wire.put_states(frame.inserts, ins, timeouts, now)
                out["ins"] += len(ins)
                want = [(st.id, st.creatorid) for st in ins if (st.id, st.creatorid) in acks]
                if want:
                    wire.put_ids(frame.ack_requested, want)
            if upd:
                wire.put_states(frame.updates, upd, timeouts, now)
                out["upd"] += len(upd)
            if updc:
                wire.put_compressed(frame.compressed, updc, timeouts, now)
                out["upd_c"] += len(updc)
            if room > 0 and vtw:
                part, vtw = vtw[:room], vtw[room:]
                wire.put_states(frame.time_wait, part, timeouts, now)
                out["vtw"] += len(part)
                room -= len(part)
            self._send_shared(frame, first)
            if not pending and not vtw and not deletes:
                break

    def _send_shared(self, frame: pb.SyncFrame, first: float) -> None:
        self.sequence += 1
        frame.sequence = self.sequence
        self.log.append(frame)
        self._sent_at.append((self.sequence, first))
        for link in self.peers.values():
            if link.connected and link.hello_sent:
                self._enqueue(link, frame)

    def _enqueue(self, link: PeerLink, frame: pb.SyncFrame) -> None:
        if len(link.outbox) >= OUTBOX_LIMIT:
            # A peer that does not read costs nothing more: cut it; it resumes later.
            self.stats.count("onomem")
            link.outbox.clear()
            link.connected = False
            link.last_error = "peer too slow: stream cut, will resume"
            return
        link.outbox.append(frame)

    def frames_to_send(self, name: str, now: float, limit: int = 64) -> list[pb.SyncFrame]:
        """The frames to write to ``name`` now (at most ``limit``; call again for more)."""
        link = self.peers.get(name)
        if link is None or not link.connected:
            return []
        if self._must_flush(now):
            self._flush(now)
        out: list[pb.SyncFrame] = []
        if link.superseded:
            # A stream that lost to another one to the same node: a hello, then nothing.
            if not link.hello_sent:
                out.append(self._hello(link))
                link.hello_sent = True
            link.connected = False
            self._count_out(link, out)
            return out
        if not link.hello_sent:
            if not link.configured and link.creatorid is None:
                return out  # a listener speaks once it knows who dialed (its hello)
            out.append(self._hello(link))
            link.hello_sent = True
            if not link.resume_epoch:
                # Nothing applied from this peer yet: ask for everything (pfsync at boot).
                out.append(self._bulk_request_frame())
        reply = self._reply_frame(link, now)
        if reply is not None:
            out.append(reply)
        while link.outbox and len(out) < limit:
            out.append(link.outbox.popleft())
        while link.bulk_out is not None and len(out) < limit:
            out.append(self._bulk_frame(link, now))
        digest = self._digest_frame(link, now)
        if digest is not None:
            out.append(digest)
        if link.ack_owed and not out:
            # An acknowledgement alone, at most one per flush_ms (the driver's ticker wakes
            # the writer that often): one per received frame made the one-state-per-frame
            # path 1.5x slower (bench/bench_sync.py --only batch).
            if now - link.ack_alone_at < self.settings.flush_ms / 1000:
                return out  # still owed: the next wake-up sends it
            link.ack_alone_at = now
            out.append(pb.SyncFrame(sender=self.hostid))
        link.ack_owed = False
        self._count_out(link, out)
        return out

    def _count_out(self, link: PeerLink, frames: list[pb.SyncFrame]) -> None:
        for frame in frames:
            link.frames_out += 1
            self.stats.count("opackets6" if link.v6 else "opackets")
            link.states_out += (
                len(frame.inserts.id)
                + len(frame.updates.id)
                + len(frame.time_wait.id)
                + len(frame.compressed.id)
                + len(frame.deletes.id)
            )
            frame.ack = link.applied

    def _hello(self, link: PeerLink) -> pb.SyncFrame:
        self.stats.actions_out["hello"] += 1
        return pb.SyncFrame(
            sender=self.hostid,
            hello=pb.Hello(
                version=VERSION,
                creatorid=self.hostid,
                epoch=self.epoch,
                resume_epoch=link.resume_epoch,
                resume_sequence=link.resume_sequence,
            ),
        )

    def _bulk_request_frame(self) -> pb.SyncFrame:
        frame = pb.SyncFrame(sender=self.hostid)
        wire.put_ids(frame.update_requests, [(0, 0)])
        self.stats.actions_out["upd_req"] += 1
        return frame

    def _reply_frame(self, link: PeerLink, now: float) -> pb.SyncFrame | None:
        timeouts = self.table.timeouts
        frame = pb.SyncFrame(sender=self.hostid)
        used = False
        if link.reply_acks:
            wire.put_ids(frame.insert_acks, link.reply_acks)
            self.stats.actions_out["ins_ack"] += len(link.reply_acks)
            link.reply_acks = []
            used = True
        if link.reply_requests:
            wire.put_ids(frame.update_requests, link.reply_requests)
            self.stats.actions_out["upd_req"] += len(link.reply_requests)
            link.reply_requests = {}
            used = True
        if link.reply_full:
            full = [st for st in link.reply_full.values() if st.timeout != tmo.TIME_WAIT]
            tw = [st for st in link.reply_full.values() if st.timeout == tmo.TIME_WAIT]
            link.reply_full = {}
            live = [st for st in full if self.table.get_by_id(st.id, st.creatorid) is st]
            if live:
                wire.put_states(frame.updates, live, timeouts, now)
                self.stats.actions_out["upd"] += len(live)
            if tw:
                wire.put_states(frame.time_wait, tw, timeouts, now)
                self.stats.actions_out["vtw"] += len(tw)
            used = used or bool(live or tw)
        return frame if used else None

    def _digest_frame(self, link: PeerLink, now: float) -> pb.SyncFrame | None:
        # The digest describes our table after every frame before it on the stream, so it
        # goes last, and only when nothing of ours is still queued or pending: sent ahead
        # of our own frames it read as a mismatch on the peer (counted, strikes). A busy
        # turn skips to the next interval (the peer would not compare it anyway), so
        # next_timer() does not report a past time over and over.
        if now < link.next_digest:
            return None
        link.next_digest = now + self.settings.digest_interval
        if link.outbox or link.bulk_out is not None or self._first_change is not None:
            return None
        frame = pb.SyncFrame(sender=self.hostid)
        frame.digest.value = self.digest.value
        frame.digest.states = self.digest.states
        frame.digest.applied = link.applied
        self.stats.actions_out["digest"] += 1
        return frame

    # ---- bulk update -------------------------------------------------------------------

    def _start_bulk(self, link: PeerLink) -> None:
        states = [st for st in self.table.states() if not st.flags & FLAG_NOSYNC]
        records = [st for st in self.table.time_wait_states() if not st.flags & FLAG_NOSYNC]
        size = self.settings.bulk_states

        def chunks() -> Iterator[list[State]]:
            everything = states + records
            for i in range(0, len(everything), size):
                yield everything[i : i + size]

        link.bulk_out = chunks()
        link.bulk_covers = self.sequence
        frame = pb.SyncFrame(sender=self.hostid)
        frame.bulk.status = pb.BULK_STATUS_KIND_START
        frame.bulk.creatorid = self.hostid
        self.stats.actions_out["bus"] += 1
        link.outbox.appendleft(frame)

    def _bulk_frame(self, link: PeerLink, now: float) -> pb.SyncFrame:
        assert link.bulk_out is not None
        frame = pb.SyncFrame(sender=self.hostid)
        chunk = next(link.bulk_out, None)
        if chunk is None:
            link.bulk_out = None
            frame.bulk.status = pb.BULK_STATUS_KIND_END
            frame.bulk.creatorid = self.hostid
            self.stats.actions_out["bus"] += 1
            return frame
        full = [st for st in chunk if st.timeout != tmo.TIME_WAIT]
        # A state removed since the bulk began is skipped (its DEL_C went out already).
        live = [st for st in full if self.table.get_by_id(st.id, st.creatorid) is st]
        tw = [st for st in chunk if st.timeout == tmo.TIME_WAIT]
        timeouts = self.table.timeouts
        if live:
            wire.put_states(frame.updates, live, timeouts, now)
            self.stats.actions_out["upd"] += len(live)
        if tw:
            wire.put_states(frame.time_wait, tw, timeouts, now)
            self.stats.actions_out["vtw"] += len(tw)
        return frame

    # ---- receiving ---------------------------------------------------------------------

    def receive(self, name: str, frame: pb.SyncFrame, now: float, size: int = 0) -> None:
        """Apply a frame from peer ``name``. Bad frames are counted and dropped."""
        link = self.peers.get(name)
        if link is None or not link.connected or link.superseded:
            return
        link.frames_in += 1
        link.bytes_in += size
        self.stats.count("ipackets6" if link.v6 else "ipackets")
        if frame.HasField("hello"):
            self._hello_in(link, frame.hello, now)
            return
        if link.creatorid is None:
            self.stats.count("hdrops")  # actions before a hello
            return
        if len(UnknownFieldSet(frame)):
            self.stats.count("badact")
            return
        if frame.sequence:
            if frame.sequence <= link.applied:
                return  # already applied (resent from the log after a resume)
        try:
            self._apply(link, frame, now)
        except wire.FrameError as exc:
            self.stats.count(exc.counter)
            link.last_error = f"dropped a frame: {exc}"
            return
        if frame.sequence:
            link.applied = frame.sequence
            link.ack_owed = True
        if frame.ack:
            self._acked(link, frame.ack, now)

    def _hello_in(self, link: PeerLink, hello: pb.Hello, now: float) -> None:
        self.stats.actions_in["hello"] += 1
        if hello.version != VERSION:
            self.stats.count("badver")
            link.last_error = f"peer speaks version {hello.version}"
            return
        if link.epoch != hello.epoch:
            saved = self._resume.get(hello.creatorid)
            # A new process on the other side restarts its sequences; the same one (we
            # kept where we were in its frames) is resumed, even from sequence 0.
            known = saved is not None and saved[0] == hello.epoch
            link.applied = saved[1] if saved is not None and known else 0
            if not link.hello_sent:  # a listener: its hello is not out yet
                link.resume_epoch = hello.epoch if known else 0
                link.resume_sequence = link.applied
        link.creatorid, link.epoch = hello.creatorid, hello.epoch
        link.hello_received = True
        link.last_error = ""  # the stream works again; what failed before is history
        for other in list(self.peers.values()):
            if other is link or not other.connected or other.creatorid != hello.creatorid:
                continue
            # Two streams to one node (both dial each other): both ends keep the one
            # dialed by the lower hostid, so they agree without a word.
            mine = self.hostid if link.configured else hello.creatorid
            theirs = self.hostid if other.configured else hello.creatorid
            loser = link if mine > theirs else other
            loser.superseded = True
            loser.last_error = "another stream to the same node is used"
            loser.outbox.clear()
            if loser.hello_sent:
                loser.connected = False
            # else: it still says hello (frames_to_send), so the other end learns who we
            # are and drops the stream too, by the same rule.
            if loser is link:
                return
        if not hello.resume_epoch:
            return  # a fresh peer asks for a bulk update itself (UPD_REQ 0, 0)
        if hello.resume_epoch == self.epoch:
            frames = self.log.since(hello.resume_sequence, self.sequence)
            if frames is not None:
                for f in frames:
                    self._enqueue(link, f)
                return
        # Its resume point is gone from our log, or belongs to our previous process.
        self.stats.bulk_fallbacks += 1
        self._start_bulk(link)

    def _apply(self, link: PeerLink, frame: pb.SyncFrame, now: float) -> None:
        table = self.table
        ins = upd = tw = None
        # Validate every group before changing anything: a bad frame changes nothing.
        if frame.HasField("inserts"):
            ins = wire.read_states(frame.inserts, now, table.timeouts)
        if frame.HasField("updates"):
            upd = wire.read_states(frame.updates, now, table.timeouts)
        if frame.HasField("time_wait"):
            tw = wire.read_states(frame.time_wait, now, table.timeouts)
        comp = wire.read_compressed(frame.compressed) if frame.HasField("compressed") else None
        requests = wire.read_ids(frame.update_requests)
        deletes = wire.read_ids(frame.deletes)
        acks = wire.read_ids(frame.insert_acks)
        ack_requested = wire.read_ids(frame.ack_requested)
        if tw and any(st.proto != 6 for st in tw):
            raise wire.FrameError("badval", "a TIME_WAIT state that is not TCP")
        ain = self.stats.actions_in
        for creatorid in frame.clear:
            ain["clr"] += 1
            table.clear(creatorid, RemoveReason.FLUSHED, Origin.PEER)
        # Deletes before states: see _flush (a deleted key may be reused in this frame).
        for ident in deletes:
            ain["del_c"] += 1
            link.states_in += 1
            if not table.apply_delete(ident[0], ident[1]):
                self.stats.count("badstate")
        for group, name in ((ins, "ins"), (upd, "upd"), (tw, "vtw")):
            if group:
                ain[name] += len(group)
                link.states_in += len(group)
                if link.bulk_in:
                    link.bulk_received += len(group)
                for st in group:
                    self._result(link, table.apply_state(st, now), st.id, st.creatorid)
        if comp is not None:
            self._apply_compressed(link, comp, now)
        for ident in requests:
            ain["upd_req"] += 1
            self._update_request(link, ident)
        for ident in acks:
            ain["ins_ack"] += 1
            self._release(*ident)
        for ident in ack_requested:
            link.reply_acks.append(ident)
        if frame.HasField("bulk"):
            ain["bus"] += 1
            self._bulk_status(link, frame.bulk.status)
        if frame.HasField("digest"):
            ain["digest"] += 1
            self._digest_in(link, frame.digest, now)

    def _apply_compressed(self, link: PeerLink, comp: wire.Compressed, now: float) -> None:
        table = self.table
        self.stats.actions_in["upd_c"] += len(comp.ids)
        link.states_in += len(comp.ids)
        s, d = comp.src, comp.dst
        for i in range(len(comp.ids)):
            ident = (comp.ids[i], comp.creators[i])
            result = table.apply_compressed(
                ident[0],
                ident[1],
                comp.timeout[i],
                comp.expires_in_ms[i],
                (s.state[i], s.seqlo[i], s.seqhi[i], s.max_win[i], s.wscale[i]),
                (d.state[i], d.seqlo[i], d.seqhi[i], d.max_win[i], d.wscale[i]),
                now,
            )
            self._result(link, result, *ident)

    def _result(self, link: PeerLink, result: int, id: int, creatorid: int) -> None:
        if result == APPLIED:
            return
        if result == STALE:
            self.stats.count("stale")
            self._queue_reply(link, id, creatorid)
        elif result == UNKNOWN:
            link.reply_requests[(id, creatorid)] = None
        elif result == FAILED:
            self.stats.count("badstate")
        else:
            self.stats.count("badval")

    def _queue_reply(self, link: PeerLink, id: int, creatorid: int) -> bool:
        st = self.table.get_by_id(id, creatorid)
        if st is None:
            st = self.table.time_wait_state(id, creatorid)
        if st is None or st.flags & FLAG_NOSYNC:
            return False
        link.reply_full[(id, creatorid)] = st
        return True

    def _update_request(self, link: PeerLink, ident: tuple[int, int]) -> None:
        if ident == (0, 0):
            if link.bulk_out is None:  # a repeated request joins the bulk under way
                self._start_bulk(link)
        elif not self._queue_reply(link, *ident):
            self.stats.count("badstate")

    def _bulk_status(self, link: PeerLink, status: int) -> None:
        if status == pb.BULK_STATUS_KIND_START:
            link.bulk_in, link.bulk_received = True, 0
        elif status == pb.BULK_STATUS_KIND_END:
            link.bulk_in = False
            if not self.ready:
                self.ready = True
                self._next_bulk_request = None
                log.info("bulk update from %s done: ready", link.name)
        else:
            self.stats.count("badval")

    def _digest_in(self, link: PeerLink, digest: pb.TableDigest, now: float) -> None:
        link.peer_digest = digest.value
        # Compare only when nothing is in flight either way and no bulk is running.
        quiet = (
            max(digest.applied, link.bulk_covers) == self.sequence
            and self._first_change is None
            and not link.outbox
            and link.bulk_out is None
            and not link.bulk_in
        )
        if not quiet:
            return
        link.digest_agrees = digest.value == self.digest.value
        if link.digest_agrees:
            link.digest_strikes = 0
            return
        self.stats.digest_mismatches += 1
        link.digest_strikes += 1
        if link.digest_strikes >= DIGEST_STRIKES:
            if now - link.last_repair >= self.settings.repair_holdoff:
                link.last_repair = now
                link.digest_strikes = 0
                self.stats.repairs += 1
                log.warning("table digest differs from %s: asking for a bulk update", link.name)
                link.reply_requests[(0, 0)] = None

    def _acked(self, link: PeerLink, ack: int, now: float) -> None:
        if ack <= link.acked:
            return
        link.acked = ack
        if not self._sent_at:
            return
        # The lag of the newest acknowledged frame: from its oldest change to this ack.
        latest = None
        for seq, first in self._sent_at:
            if seq > ack:
                break
            latest = first
        if latest is None:
            return
        ms = (now - latest) * 1000
        i = 0
        while i < len(LAG_BUCKETS_MS) and ms > LAG_BUCKETS_MS[i]:
            i += 1
        link.lag_ms[i] += 1
        # Forget frames every connected peer has acknowledged.
        low = min((p.acked for p in self.peers.values() if p.connected), default=ack)
        while self._sent_at and self._sent_at[0][0] <= low:
            self._sent_at.popleft()
        if len(self._sent_at) > self.log.capacity:
            for _ in range(len(self._sent_at) - self.log.capacity):
                self._sent_at.popleft()

    # ---- deferral ----------------------------------------------------------------------

    def _release(self, id: int, creatorid: int) -> None:
        if self._deferred.pop((id, creatorid), None) is not None:
            self._released.append((id, creatorid))

    def is_held(self, ident: tuple[int, int]) -> bool:
        """Whether the new state ``(id, creatorid)`` still waits for an INS_ACK."""
        return ident in self._deferred

    def take_released(self) -> list[tuple[int, int]]:
        """Deferred states whose packet may go now (acknowledged or timed out)."""
        out, self._released = self._released, []
        return out

    # ---- time --------------------------------------------------------------------------

    def next_timer(self) -> float | None:
        """When ``handle_timer`` must run next (None: only when something happens)."""
        times = []
        if self._first_change is not None:
            times.append(self._first_change + self.settings.flush_ms / 1000)
        if self._next_bulk_request is not None:
            times.append(self._next_bulk_request)
        if self._deferred:
            times.append(min(self._deferred.values()))
        for link in self.peers.values():
            if link.connected and link.hello_sent:
                times.append(link.next_digest)
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        """Flush due frames, retry bulk requests, release deferred packets."""
        if self._must_flush(now):
            self._flush(now)
        if self._deferred:
            due = [ident for ident, when in self._deferred.items() if when <= now]
            for ident in due:
                self.stats.defer_timeouts += 1
                self._release(*ident)
        if self._next_bulk_request is not None and now >= self._next_bulk_request:
            self._bulk_retry(now)
        if now >= self._next_prune:
            self._next_prune = now + PEER_RECENT_SECONDS
            old = [st for st, when in self._peer_touched.items() if now - when >= 2]
            for st in old:
                del self._peer_touched[st]

    def _bulk_retry(self, now: float) -> None:
        if self.ready:
            self._next_bulk_request = None
            return
        if self.bulk_attempts >= BULK_ATTEMPTS:
            self.ready, self.bulk_gave_up = True, True
            self._next_bulk_request = None
            log.warning("no bulk update after %d requests: ready without one", BULK_ATTEMPTS)
            return
        self.bulk_attempts += 1
        self._next_bulk_request = now + BULK_RETRY_SECONDS
        if self.bulk_attempts == 1:
            return  # the hello of each stream carries the first request
        for link in self.peers.values():
            # Only where the peer answered (its hello): a stream still being set up has
            # the first request queued already.
            if link.connected and link.hello_received and not link.bulk_in:
                link.reply_requests[(0, 0)] = None

    # ---- figures -----------------------------------------------------------------------

    def ready_reason(self) -> str:
        """Why the node is (not) ready, in words (pfctl -s sync)."""
        if not any(link.configured for link in self.peers.values()) and self.bulk_attempts == 0:
            return "no peers to wait for" if self.ready else "waiting for a bulk update"
        if self.bulk_gave_up:
            return "gave up waiting for a bulk update"
        if self.ready:
            return "bulk update done"
        return f"waiting for a bulk update (attempt {self.bulk_attempts} of {BULK_ATTEMPTS})"

    def in_flight(self) -> int:
        """Our frames not yet acknowledged by the slowest connected peer."""
        acked = [p.acked for p in self.peers.values() if p.connected]
        return self.sequence - min(acked) if acked else 0
