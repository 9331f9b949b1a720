"""The state table: lookup, creation policy, non-TCP tracking, limits, purge, counters.

``StateTable.test(packet, now)`` is pf_test() for one decoded packet (see
:mod:`statetable.decode`): it finds the packet's state in either direction, tracks it
(TCP: :mod:`statetable.tcp`), or creates one when the policy allows, and returns PASS or
BLOCK. Policy (there is no rule language): TCP states are created by a SYN without ACK,
UDP/ICMP/other states by their first packet; ICMP errors never create states and pass
only when they quote a tracked connection. Everything else is blocked and counted.

TIME_WAIT: once both peers of a TCP state are >= FIN_WAIT_2 (or an RST ended it) the
connection is in TIME_WAIT for 2 x MSL of its MSLT class (:mod:`statetable.mslt`), and
what late segments do is decided by :mod:`statetable.timewait`. With
``net.inet.tcp.vtw.enable`` on, the state leaves the main table for a compact record in
the VTW pools (:mod:`statetable.vtw`); off, it stays a full state with timeout
``TIME_WAIT``. Lookups try the main table, then the pools; verdicts are the same either
way. A pure SYN on a TIME_WAIT connection frees it and creates a fresh state at once (pf
drops that SYN and lets the retransmission create the state; creating it at once saves
the client a retransmission timeout).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from pydantic import BaseModel, Field, field_validator

from statetable import keys, tcp, timewait
from statetable import timeouts as tmo
from statetable.counters import (
    FCNT_STATE_INSERT,
    FCNT_STATE_REMOVALS,
    FCNT_STATE_SEARCH,
    PFRES_BADSTATE,
    PFRES_MATCH,
    PFRES_MAXSTATES,
    PFRES_NAMES,
    PFRES_STATEINS,
    ProtoStats,
)
from statetable.decode import (
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    P_ACK,
    P_DLEN,
    P_FLAGS,
    P_IPLEN,
    P_KEY,
    P_OPT,
    P_SEQ,
    P_WIN,
    TH_RST,
    TH_SYN,
    Packet,
)
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
from statetable.mslt import (
    FLAG_MASK as MSLT_FLAGS,
)
from statetable.mslt import (
    Mslt,
    MsltConfig,
    Network,
    class_flags,
    stored_class,
)
from statetable.state import ESTABLISHED, FIN_WAIT_2, MULTIPLE, PACKET, SINGLE, U16, Peer, State
from statetable.tcp import SYN_ONLY_MASK, H, M
from statetable.vtw import TICKS, WSCALE_BITS, Pool, Vestigial, Vtw, VtwConfig, quantize

PASS, BLOCK = 0, 1
# Results of applying a sync peer's action (see StateTable.apply_state).
APPLIED, STALE, UNKNOWN, FAILED, BADVAL = range(5)
# The one range of the state limit (--limit-states, the config file, net.pf.limit.states);
# the upper bound is a C int in pf.
LIMIT_STATES_MIN = 1
LIMIT_STATES_MAX = (1 << 31) - 1
_UNLINKED = tmo.UNLINKED
# Per protocol: (first, single, multiple) timeouts.
_UDP_TIMEOUTS = (tmo.UDP_FIRST, tmo.UDP_SINGLE, tmo.UDP_MULTIPLE)
_OTHER_TIMEOUTS = (tmo.OTHER_FIRST, tmo.OTHER_SINGLE, tmo.OTHER_MULTIPLE)
_TIME_WAIT = tmo.TIME_WAIT  # a module constant: one lookup less per TCP packet


def _seq_gt(a: int, b: int) -> bool:
    """TCP's SEQ_GT: ``a`` is after ``b`` in 32-bit sequence space."""
    return 0 < (a - b) & M < H


class TableConfig(BaseModel):
    """Settings of a table (validated: they may come from flags, files or the API)."""

    hostid: int = Field(1, ge=0, le=0xFFFFFFFF)
    # First state id; pf uses (boot time << 32) so ids stay unique across restarts.
    id_base: int = Field(1 << 32, ge=1, lt=1 << 64)
    limit_states: int = Field(100000, ge=LIMIT_STATES_MIN, le=LIMIT_STATES_MAX)
    timeouts: dict[str, int] = Field(default_factory=dict)
    mslt: MsltConfig = Field(default_factory=MsltConfig)
    vtw: VtwConfig = Field(default_factory=VtwConfig)
    # MSLT's "local" networks (the node passes its interfaces' networks by default).
    local_nets: list[Network] = Field(default_factory=list)

    @field_validator("timeouts")
    @classmethod
    def _known_timeouts(cls, value: dict[str, int]) -> dict[str, int]:
        for name, seconds in value.items():
            if name not in tmo.BY_NAME:
                raise ValueError(f"unknown timeout {name!r}")
            if not 0 <= seconds <= tmo.TIMEOUT_MAX:
                raise ValueError(f"timeout {name} must be in 0..{tmo.TIMEOUT_MAX}")
        return value


class StateTable:
    """pf's state table. Sans-I/O: time comes in as ``now`` (seconds)."""

    def __init__(self, config: TableConfig | None = None) -> None:
        config = config or TableConfig()
        self.hostid = config.hostid
        self.limit_states = config.limit_states
        self.timeouts: list[int] = list(tmo.DEFAULTS)
        for name, seconds in config.timeouts.items():
            self.timeouts[tmo.BY_NAME[name]] = seconds
        self._next_id = config.id_base
        # One dict per protocol, key -> State (keys do not carry the protocol).
        self._by_proto: dict[int, dict[bytes, State]] = {
            IPPROTO_TCP: {},
            IPPROTO_UDP: {},
            IPPROTO_ICMP: {},
            IPPROTO_ICMPV6: {},
        }
        self._tcp = self._by_proto[IPPROTO_TCP]
        # creatorid -> id -> State; nested so no (id, creatorid) tuple is kept per state.
        self._by_id: dict[int, dict[int, State]] = {}
        self.count = 0
        self.half_open = 0
        self.pfres: list[int] = [0] * len(PFRES_NAMES)
        self.fcounters: list[int] = [0, 0, 0]
        self.passed = 0
        self.blocked = 0
        self.stats = ProtoStats()
        self.mslt = Mslt(config.mslt, config.local_nets)
        self.vtw = Vtw(config.vtw)
        self.vtw.on_remove = self._record_removed
        # Changes since the last take_changes(), while someone reads them (else None:
        # nothing is recorded). See statetable.events.
        self._changes: list[object] | None = None
        # Who causes the changes being made: PEER while a sync peer's frame is applied.
        self._origin = Origin.LOCAL
        self._purge_queue: list[State] = []
        self._purge_pos = 0

    def record_changes(self, on: bool = True) -> None:
        """Start (or stop) recording changes for :meth:`take_changes`."""
        self._changes = [] if on else None

    def take_changes(self) -> list[object]:
        """The changes since the last call, oldest first (see :mod:`statetable.events`):
        a bare State for a packet that moved only windows, counters or expiry, an event
        object for everything else. The owner hands the list to every consumer."""
        changes = self._changes
        if changes is None:
            return []
        self._changes = []
        return changes

    # ---- per-packet path -------------------------------------------------------------

    def test(self, pkt: Packet, now: float) -> int:
        """pf_test() for one decoded packet: PASS or BLOCK."""
        # The positions are decode.P_*; one unpack is the cheapest way to read them all.
        proto, key, flags, seq, ack, win, dlen, iplen, opt = pkt
        self.fcounters[FCNT_STATE_SEARCH] += 1
        if proto == IPPROTO_TCP:
            tab = self._tcp
            st = tab.get(key)
            fwd = True
            if st is None:
                rkey = keys.reverse(key)
                st = tab.get(rkey)
                fwd = False
                if st is None:
                    if self.vtw.live:
                        self.fcounters[FCNT_STATE_SEARCH] += 1
                        hit = self.vtw.find(key, rkey)
                        if hit is not None:
                            return self._record_segment(hit, pkt, now)
                    if flags & SYN_ONLY_MASK == TH_SYN:
                        return self._create_tcp(pkt, now)
                    return self._no_state()
            if st.timeout == _TIME_WAIT:
                return self._time_wait_segment(st, fwd, pkt, now)
            if fwd:
                st.traffic += PACKET + iplen
            else:
                st.dst.traffic += PACKET + iplen
            old_src = st.state
            old_dst = st.dst.state
            if not tcp.track(st, fwd, flags, seq, ack, win, dlen, opt, now):
                return self._mismatch()
            if old_src < ESTABLISHED <= st.state:
                self.half_open -= 1
                self.stats.tcp_accepts += 1
                if not st.flags & MSLT_FLAGS:
                    st.flags |= class_flags(self.mslt.classify(key))
            if old_dst < ESTABLISHED and st.dst.state >= ESTABLISHED:
                self.stats.tcp_connects += 1
            if st.state >= FIN_WAIT_2 and st.dst.state >= FIN_WAIT_2:
                if flags & TH_RST:
                    self.stats.tcp_resets += 1
                else:
                    self.stats.tcp_closed += 1
                self._enter_time_wait(st, now, old_src, old_dst)
            elif self._changes is not None:
                if st.state == old_src and st.dst.state == old_dst:
                    self._changes.append(st)
                else:
                    self._changes.append(StateUpdated(st, old_src, old_dst, st.state, st.dst.state))
            self.passed += 1
            return PASS
        if (proto == IPPROTO_ICMP or proto == IPPROTO_ICMPV6) and opt is not None:
            return self._icmp_error(opt)  # an ICMP error: opt is the (proto, key) it quotes
        return self._test_stateless_proto(proto, key, iplen, now)

    # ---- TIME_WAIT ---------------------------------------------------------------------

    def _enter_time_wait(
        self, st: State, now: float, old_src: int, old_dst: int, expire: float | None = None
    ) -> None:
        """Both peers are done: TIME_WAIT for 2 x MSL (or until a peer's ``expire``), as
        a VTW record when enabled."""
        cls = self.mslt.state_class(st.key, st.flags)
        if expire is None:
            expire = now + self.mslt.time_wait(cls)
        expire = quantize(expire)
        if self.vtw.enabled and self.vtw.insert(st, cls, expire, now):
            self._unlink(st)
            if self._changes is not None:
                self._changes.append(
                    StateVestigial(st, expire, cls, old_src, old_dst, self._origin)
                )
            return
        st.flags = (st.flags & ~MSLT_FLAGS) | class_flags(cls)
        st.timeout = tmo.TIME_WAIT
        st.expire = expire
        if self._changes is not None:
            self._changes.append(
                StateUpdated(st, old_src, old_dst, st.state, st.dst.state, self._origin)
            )

    def _time_wait_segment(self, st: State, fwd: bool, pkt: Packet, now: float) -> int:
        """A segment for a full state in TIME_WAIT (VTW off)."""
        if st.expire <= now:
            self.remove(st, RemoveReason.EXPIRED)
            return self._no_tcp_state(pkt, now)
        src: Peer
        dst: Peer
        src, dst = (st, st.dst) if fwd else (st.dst, st)
        action = timewait.segment(
            pkt[P_FLAGS],
            pkt[P_SEQ],
            pkt[P_ACK],
            pkt[P_DLEN],
            src.seqlo,
            src.wscale,
            dst.seqlo,
            dst.max_win,
            dst.wscale,
        )
        if action == timewait.PASS:
            src.traffic += PACKET + pkt[P_IPLEN]
            st.expire = quantize(now + self.mslt.time_wait(stored_class(st.flags)))
            if self._changes is not None:
                self._changes.append(st)
        elif action == timewait.CLOSE:
            self.remove(st, RemoveReason.CLOSED)
        elif action == timewait.REOPEN:
            self.remove(st, RemoveReason.REUSED)
            return self._create_tcp(pkt, now)
        else:
            return self._mismatch()
        self.stats.tcp_timewait_passed += 1
        self.passed += 1
        return PASS

    def _record_segment(self, hit: tuple[Pool, int, bool], pkt: Packet, now: float) -> int:
        """A segment for a VTW record: the same decisions as :meth:`_time_wait_segment`."""
        pool, slot, fwd = hit
        if pool.expire[slot] + pool.base <= now * TICKS:  # exact: see vtw.TICKS
            self.vtw.remove(pool, slot, RemoveReason.EXPIRED)
            return self._no_tcp_state(pkt, now)
        s = slot + slot if fwd else slot + slot + 1
        d = s ^ 1
        action = timewait.segment(
            pkt[P_FLAGS],
            pkt[P_SEQ],
            pkt[P_ACK],
            pkt[P_DLEN],
            pool.seqlo[s],
            pool.peer[s] & WSCALE_BITS,
            pool.seqlo[d],
            pool.max_win[d],
            pool.peer[d] & WSCALE_BITS,
        )
        if action == timewait.PASS:
            self.vtw.restart(pool, slot, quantize(now + self.mslt.time_wait(pool.cls)))
        elif action == timewait.CLOSE:
            self.vtw.remove(pool, slot, RemoveReason.CLOSED)
        elif action == timewait.REOPEN:
            self.vtw.remove(pool, slot, RemoveReason.REUSED)
            return self._create_tcp(pkt, now)
        else:
            return self._mismatch()
        self.stats.tcp_timewait_passed += 1
        self.passed += 1
        return PASS

    def _record_removed(self, pool: Pool, slot: int, reason: RemoveReason) -> None:
        if self._changes is not None:
            rec = pool.view(slot)
            self._changes.append(
                VestigialRemoved(
                    rec.key,
                    rec.id,
                    rec.creatorid,
                    rec.src.state,
                    rec.dst.state,
                    reason,
                    self._origin,
                )
            )

    def _no_tcp_state(self, pkt: Packet, now: float) -> int:
        """A TCP segment whose TIME_WAIT connection just expired: as if none was found."""
        if pkt[P_FLAGS] & SYN_ONLY_MASK == TH_SYN:
            return self._create_tcp(pkt, now)
        return self._no_state()

    def _mismatch(self) -> int:
        """A TCP segment that does not fit its state's windows."""
        self.stats.tcp_badstate += 1
        self.pfres[PFRES_BADSTATE] += 1
        self.blocked += 1
        return BLOCK

    def set_vtw_enabled(self, enable: bool) -> None:
        """Switch VTW on or off, moving every TIME_WAIT connection across (none is lost)."""
        if enable == self.vtw.enabled:
            return
        self.vtw.enabled = enable
        if enable:
            waiting = [st for st in self._tcp.values() if st.timeout == tmo.TIME_WAIT]
            for st in sorted(waiting, key=lambda st: st.expire):  # pools keep age order
                if self.vtw.insert(st, stored_class(st.flags), st.expire):
                    self._unlink(st)
                    if self._changes is not None:
                        self._changes.append(StateMoved(st, True))
            return
        for st in self.vtw.drain():
            st.timeout = tmo.TIME_WAIT
            self._link(st, announce=False)
            if self._changes is not None:
                self._changes.append(StateMoved(st, False))

    def set_vtw_entries(self, entries: int) -> None:
        """Resize the VTW pools (the oldest records are evicted if they no longer fit)."""
        self.vtw.resize(entries)

    # ---- verdicts without a state ----------------------------------------------------

    def _no_state(self) -> int:
        # Neither matches a state nor may create one: the implicit "block" rule matched.
        self.stats.tcp_nostate += 1
        self.pfres[PFRES_MATCH] += 1
        self.blocked += 1
        return BLOCK

    def _create_tcp(self, pkt: Packet, now: float) -> int:
        """A state from a pure SYN (the caller checked the flags)."""
        st = self._new_state(pkt[P_KEY], IPPROTO_TCP, now)
        if st is None:
            return BLOCK
        tcp.init_state(st, pkt[P_FLAGS], pkt[P_SEQ], pkt[P_WIN], pkt[P_DLEN], pkt[P_OPT])
        self.stats.tcp_connattempt += 1
        st.timeout = tmo.TCP_FIRST
        st.traffic = PACKET + pkt[P_IPLEN]
        self.half_open += 1
        self._link(st)
        return PASS

    def _test_stateless_proto(self, proto: int, key: bytes, iplen: int, now: float) -> int:
        """UDP, ICMP queries and other protocols: peers go NO_TRAFFIC -> SINGLE -> MULTIPLE."""
        tab = self._by_proto.get(proto)
        if tab is None:
            tab = self._by_proto[proto] = {}
        st = tab.get(key)
        fwd = True
        if st is None:
            st = tab.get(keys.reverse(key))
            fwd = False
            if st is None:
                st = self._new_state(key, proto, now)
                if st is None:
                    return BLOCK
                st.traffic = PACKET + iplen
                if proto == IPPROTO_ICMP or proto == IPPROTO_ICMPV6:
                    st.timeout = tmo.ICMP_FIRST
                    self.stats.icmp_states += 1
                else:
                    st.state = SINGLE
                    if proto == IPPROTO_UDP:
                        st.timeout = tmo.UDP_FIRST
                        self.stats.udp_states += 1
                    else:
                        st.timeout = tmo.OTHER_FIRST
                        self.stats.other_states += 1
                self._link(st)
                return PASS
        src: Peer
        dst: Peer
        if fwd:
            src, dst = st, st.dst
        else:
            src, dst = st.dst, st
        src.traffic += PACKET + iplen
        st.expire = now
        old_src = st.state
        old_dst = st.dst.state
        if proto == IPPROTO_ICMP or proto == IPPROTO_ICMPV6:
            st.timeout = tmo.ICMP_ERROR  # pf: any matching ICMP query or reply
        else:
            if src.state < SINGLE:
                src.state = SINGLE
            if dst.state == SINGLE:
                dst.state = MULTIPLE
            first, single, multiple = _UDP_TIMEOUTS if proto == IPPROTO_UDP else _OTHER_TIMEOUTS
            st.timeout = multiple if src.state == MULTIPLE and dst.state == MULTIPLE else single
        changes = self._changes
        if changes is not None:
            if st.state == old_src and st.dst.state == old_dst:
                changes.append(st)
            else:
                changes.append(StateUpdated(st, old_src, old_dst, st.state, st.dst.state))
        self.passed += 1
        return PASS

    def _icmp_error(self, quoted: tuple[int, bytes]) -> int:
        """An ICMP error passes when the packet it quotes belongs to a tracked state."""
        proto, key = quoted
        tab = self._by_proto.get(proto)
        rkey = keys.reverse(key)
        if (
            tab is not None
            and (key in tab or rkey in tab)
            or proto == IPPROTO_TCP
            and self.vtw.live
            and self.vtw.find(key, rkey) is not None
        ):
            self.stats.icmp_errors_passed += 1
            self.passed += 1
            return PASS
        self.stats.icmp_errors_blocked += 1
        self.pfres[PFRES_BADSTATE] += 1
        self.blocked += 1
        return BLOCK

    # ---- creation, insertion, removal ------------------------------------------------

    def _new_state(self, key: bytes, proto: int, now: float) -> State | None:
        """A fresh local state, or None (counted) when the table is full."""
        self.pfres[PFRES_MATCH] += 1
        if self.count >= self.limit_states:
            self.pfres[PFRES_MAXSTATES] += 1
            self.blocked += 1
            return None
        st = State(key, proto, self._next_id, self.hostid, now)
        self._next_id += 1
        self.passed += 1
        return st

    def _link(self, st: State, announce: bool = True) -> None:
        self._by_proto[st.proto][st.key] = st
        ids = self._by_id.get(st.creatorid)
        if ids is None:
            ids = self._by_id[st.creatorid] = {}
        ids[st.id] = st
        self.count += 1
        self.fcounters[FCNT_STATE_INSERT] += 1
        if announce and self._changes is not None:
            self._changes.append(StateInserted(st, st.state, st.dst.state, self._origin))

    def insert(self, st: State) -> bool:
        """Insert a state built elsewhere (a sync peer's); False (counted) if it collides.

        A state whose key or (id, creatorid) is already present is refused with
        ``state-insert``; a full table refuses with ``state-limit``. A VTW record with
        the same connection is superseded: the new state is the newer connection. A
        state in TIME_WAIT (both peers >= FIN_WAIT_2) becomes a VTW record when VTW is
        on, as a local one would; its ``expire`` is then its absolute expiry.
        """
        tab = self._by_proto.get(st.proto)
        if tab is None:
            tab = self._by_proto[st.proto] = {}
        rkey = keys.reverse(st.key)
        if st.key in tab or rkey in tab or self.get_by_id(st.id, st.creatorid) is not None:
            self.pfres[PFRES_STATEINS] += 1
            return False
        time_wait = (
            st.proto == IPPROTO_TCP and st.state >= FIN_WAIT_2 and st.dst.state >= FIN_WAIT_2
        )
        if st.timeout >= tmo.PFTM_MAX and not (time_wait and st.timeout == tmo.TIME_WAIT):
            raise ValueError("a state must carry a real timeout to be inserted")
        if st.proto == IPPROTO_TCP and self.vtw.live:
            hit = self.vtw.find(st.key, rkey)
            if hit is not None:
                if self._record_identity(hit[0], hit[1]) == (st.id, st.creatorid):
                    self.pfres[PFRES_STATEINS] += 1
                    return False
                self.vtw.remove(hit[0], hit[1], RemoveReason.REUSED)
        if time_wait:
            return self._insert_time_wait(st)
        if self.count >= self.limit_states:
            self.pfres[PFRES_MAXSTATES] += 1
            return False
        if st.proto == IPPROTO_TCP and st.state < ESTABLISHED:
            self.half_open += 1
        self._link(st)
        return True

    def _insert_time_wait(self, st: State) -> bool:
        """A connection already in TIME_WAIT joins the table (from a peer)."""
        cls = self.mslt.state_class(st.key, st.flags)
        if st.timeout == tmo.TIME_WAIT:
            expire = quantize(st.expire)
        else:
            expire = quantize(st.expire + self.timeouts[st.timeout])
        st.flags = (st.flags & ~MSLT_FLAGS) | class_flags(cls)
        # The record and the events describe the connection as announced (inserted,
        # then vestigial), so every consumer sees one story whatever the VTW mode.
        if self.vtw.enabled and self.vtw.insert(st, cls, expire):
            self.fcounters[FCNT_STATE_INSERT] += 1
            if self._changes is not None:
                self._changes.append(StateInserted(st, st.state, st.dst.state, self._origin))
            if self._changes is not None:
                self._changes.append(
                    StateVestigial(st, expire, cls, st.state, st.dst.state, self._origin)
                )
            return True
        if self.count >= self.limit_states:
            self.pfres[PFRES_MAXSTATES] += 1
            return False
        st.timeout = tmo.TIME_WAIT
        st.expire = expire
        self._link(st)
        return True

    # ---- a sync peer's changes (pfsync input) -----------------------------------------
    #
    # Each call applies one action of a peer's frame with Origin.PEER, so the events it
    # causes are never sent back. Results: APPLIED; STALE when our copy is newer on at
    # least one side (the caller sends it back); UNKNOWN for a compressed update of a
    # state we do not hold (the caller asks for it); FAILED when it cannot be stored
    # (key collision, full table: pfsync's badstate); BADVAL for values its protocol
    # cannot have.

    def apply_state(self, new: State, now: float) -> int:
        """A peer's full state (INS, UPD, TIME_WAIT or bulk content): imported when
        unknown, merged by pfsync's stale rule when known. ``new`` is kept if imported."""
        if new.proto != IPPROTO_TCP and (
            new.state > MULTIPLE or new.dst.state > MULTIPLE or new.timeout == tmo.TIME_WAIT
        ):
            return BADVAL
        self._origin = Origin.PEER
        try:
            cur = self.get_by_id(new.id, new.creatorid)
            if cur is not None:
                return self._merge(
                    cur,
                    new.timeout,
                    new.expire,
                    (new.state, new.seqlo, new.seqhi, new.max_win, new.wscale),
                    (new.dst.state, new.dst.seqlo, new.dst.seqhi, new.dst.max_win, new.dst.wscale),
                    now,
                )
            if new.proto == IPPROTO_TCP and self.vtw.live:
                found = self.vtw.find_id(new.id, new.creatorid)
                if found is not None:
                    return self._merge_record(new.state, new.dst.state)
            if not new.flags & MSLT_FLAGS and new.state >= ESTABLISHED and new.proto == IPPROTO_TCP:
                new.flags |= class_flags(self.mslt.classify(new.key))
            if not self._settle_collision(new):
                self.pfres[PFRES_STATEINS] += 1
                return FAILED
            return APPLIED if self.insert(new) else FAILED
        finally:
            self._origin = Origin.LOCAL

    def _settle_collision(self, new: State) -> bool:
        """Make room for a peer's state whose connection we already track; False: refuse it.

        Two nodes that both see a connection's packets (mirrored or asymmetric paths) each
        make a state for it, with their own creatorid. pfsync refuses the second by key
        (badstate), and each node keeps its own identity for the connection for good, so
        their tables never agree. Here the state of the lower creatorid wins on both nodes:
        ours gives way to a peer's lower one (removed quietly: the peer never held it), and
        a higher one is refused as pfsync refuses it. Both tables then hold the same state.
        A TIME_WAIT record meets the same connection reported earlier (neither side's
        sequence number ahead of the record's: the same collision) or a new connection on
        the same ports (a side ahead: `insert` lets the new one supersede the record).
        """
        tab = self._by_proto.get(new.proto)
        rkey = keys.reverse(new.key)
        cur = (tab.get(new.key) or tab.get(rkey)) if tab else None
        if cur is not None:
            if new.creatorid < cur.creatorid:
                self.remove(cur, RemoveReason.PEER)
            return True  # a higher one: insert refuses it by key
        if new.proto != IPPROTO_TCP or not self.vtw.live:
            return True
        hit = self.vtw.find(new.key, rkey)
        if hit is None:
            return True
        rec = hit[0].to_state(hit[1])
        if rec.creatorid == new.creatorid:
            return True
        ours = (rec.seqlo, rec.dst.seqlo) if hit[2] else (rec.dst.seqlo, rec.seqlo)
        if _seq_after(new.seqlo, ours[0]) or _seq_after(new.dst.seqlo, ours[1]):
            return True  # a newer connection on the same ports
        if new.creatorid < rec.creatorid:
            self.vtw.remove(hit[0], hit[1], RemoveReason.PEER)
            return True
        return False

    def apply_compressed(
        self,
        id: int,
        creatorid: int,
        timeout: int,
        expires_in_ms: int,
        src: tuple[int, int, int, int, int],
        dst: tuple[int, int, int, int, int],
        now: float,
    ) -> int:
        """A peer's compressed update (UPD_C): peers (state, seqlo, seqhi, max_win,
        wscale), timeout and the milliseconds left at that timeout."""
        self._origin = Origin.PEER
        try:
            cur = self.get_by_id(id, creatorid)
            if cur is None:
                if self.vtw.live and self.vtw.find_id(id, creatorid) is not None:
                    return self._merge_record(src[0], dst[0])
                return UNKNOWN
            if cur.proto != IPPROTO_TCP and (
                src[0] > MULTIPLE or dst[0] > MULTIPLE or timeout == tmo.TIME_WAIT
            ):
                return BADVAL
            if timeout == tmo.TIME_WAIT:
                expire = now + expires_in_ms / 1000
            else:
                expire = now + expires_in_ms / 1000 - self.timeouts[timeout]
            return self._merge(cur, timeout, expire, src, dst, now)
        finally:
            self._origin = Origin.LOCAL

    def apply_delete(self, id: int, creatorid: int) -> bool:
        """A peer's DEL_C: remove the state or TIME_WAIT record; False if unknown."""
        self._origin = Origin.PEER
        try:
            st = self.get_by_id(id, creatorid)
            if st is not None:
                self.remove(st, RemoveReason.PEER)
                return True
            return self.remove_vestigial_by_id(id, creatorid, RemoveReason.PEER)
        finally:
            self._origin = Origin.LOCAL

    def _merge(
        self,
        st: State,
        timeout: int,
        expire: float,
        src: tuple[int, int, int, int, int],
        dst: tuple[int, int, int, int, int],
        now: float,
    ) -> int:
        """pfsync's stale rule, side by side: our side wins when its peer state is
        higher, or equal with a later seqlo (TCP); other protocols only go forward."""
        old_src, old_dst = st.state, st.dst.state
        tcp_state = st.proto == IPPROTO_TCP
        stale = 0
        for mine, theirs in ((st, src), (st.dst, dst)):
            if mine.state > theirs[0] or (
                tcp_state and mine.state == theirs[0] and _seq_gt(mine.seqlo, theirs[1])
            ):
                stale += 1
            else:
                mine.state, mine.seqlo, mine.seqhi = theirs[0], theirs[1], theirs[2]
                mine.max_win, mine.wscale = U16[theirs[3]], theirs[4]
        if stale < 2 and st.timeout != tmo.TIME_WAIT and timeout != tmo.TIME_WAIT:
            st.timeout = timeout
            st.expire = expire
        if tcp_state:
            if old_src < ESTABLISHED <= st.state:
                self.half_open -= 1
                if not st.flags & MSLT_FLAGS:
                    st.flags |= class_flags(self.mslt.classify(st.key))
            elif st.state < ESTABLISHED <= old_src:
                self.half_open += 1
            if st.state >= FIN_WAIT_2 and st.dst.state >= FIN_WAIT_2:
                if st.timeout != tmo.TIME_WAIT:
                    when = expire if timeout == tmo.TIME_WAIT else None
                    self._enter_time_wait(st, now, old_src, old_dst, when)
                    return STALE if stale else APPLIED
            elif st.timeout == tmo.TIME_WAIT:
                st.timeout = tmo.TCP_CLOSING  # a peer knows better: not closed after all
        if self._changes is not None:
            self._changes.append(
                StateUpdated(st, old_src, old_dst, st.state, st.dst.state, Origin.PEER)
            )
        return STALE if stale else APPLIED

    @staticmethod
    def _merge_record(src_state: int, dst_state: int) -> int:
        """A peer's update of a connection we hold as a TIME_WAIT record: TIME_WAIT is
        the end, so the peer's copy can only be as new (nothing to do) or older (stale)."""
        if src_state >= FIN_WAIT_2 and dst_state >= FIN_WAIT_2:
            return APPLIED
        return STALE

    def _record_identity(self, pool: Pool, slot: int) -> tuple[int, int]:
        return pool.ids[slot], pool.creator_of(slot)

    def time_wait_states(self) -> Iterator[State]:
        """Every VTW record as a detached full State in TIME_WAIT (bulk updates)."""
        for pool, slot in self.vtw.records():
            st = pool.to_state(slot)
            st.timeout = tmo.TIME_WAIT
            yield st

    def time_wait_state(self, id: int, creatorid: int) -> State | None:
        """One VTW record as a detached full State in TIME_WAIT, or None."""
        found = self.vtw.find_id(id, creatorid) if self.vtw.live else None
        if found is None:
            return None
        st = found[0].to_state(found[1])
        st.timeout = tmo.TIME_WAIT
        return st

    def remove(self, st: State, reason: RemoveReason) -> None:
        """Unlink a state; it may still sit in the purge queue, marked UNLINKED."""
        if st.timeout == _UNLINKED:
            return
        self._unlink(st)
        if self._changes is not None:
            self._changes.append(StateRemoved(st, reason, self._origin))

    def _unlink(self, st: State) -> None:
        del self._by_proto[st.proto][st.key]
        ids = self._by_id[st.creatorid]
        del ids[st.id]
        if not ids:
            del self._by_id[st.creatorid]
        if st.proto == IPPROTO_TCP and st.state < ESTABLISHED:
            self.half_open -= 1
        st.timeout = _UNLINKED
        self.count -= 1
        self.fcounters[FCNT_STATE_REMOVALS] += 1

    # ---- lookup and iteration --------------------------------------------------------

    def get_by_id(self, id: int, creatorid: int) -> State | None:
        """The state with this sync identity, or None."""
        ids = self._by_id.get(creatorid)
        return None if ids is None else ids.get(id)

    def find(self, proto: int, key: bytes) -> tuple[State, bool] | None:
        """(state, packet-is-from-its-source) for a packet's key, in either direction."""
        tab = self._by_proto.get(proto)
        if tab is None:
            return None
        st = tab.get(key)
        if st is not None:
            return st, True
        st = tab.get(keys.reverse(key))
        return None if st is None else (st, False)

    def proto_count(self, proto: int) -> int:
        """How many full states of one protocol the table holds."""
        return len(self._by_proto.get(proto, ()))

    def states(self) -> Iterator[State]:
        """Every full state (snapshot: safe against removal while iterating)."""
        for tab in list(self._by_proto.values()):
            yield from list(tab.values())

    def vestigial(self) -> Iterator[Vestigial]:
        """A copy of every VTW record, pool by pool, oldest first."""
        for pool, slot in self.vtw.records():
            yield pool.view(slot)

    def kill_vestigial(
        self, match: Callable[[Vestigial], bool], reason: RemoveReason = RemoveReason.KILLED
    ) -> int:
        """Remove the VTW records ``match`` accepts; returns how many."""
        victims = [(pool, slot) for pool, slot in self.vtw.records() if match(pool.view(slot))]
        for pool, slot in victims:
            self.vtw.remove(pool, slot, reason)
        return len(victims)

    def vestigial_by_id(self, id: int, creatorid: int) -> Vestigial | None:
        """A copy of the VTW record with this sync identity, or None."""
        hit = self.vtw.find_id(id, creatorid)
        return None if hit is None else hit[0].view(hit[1])

    def remove_vestigial_by_id(self, id: int, creatorid: int, reason: RemoveReason) -> bool:
        """Remove the VTW record with this sync identity (a peer's delete, say); False if
        there is none."""
        hit = self.vtw.find_id(id, creatorid)
        if hit is None:
            return False
        self.vtw.remove(hit[0], hit[1], reason)
        return True

    def time_wait_endpoint(self, addr: bytes, port: int) -> list[Vestigial]:
        """VTW records whose initiator is ``addr:port`` (NetBSD's local-port lookup: is
        this source port still held by a connection in TIME_WAIT?)."""
        return [pool.view(slot) for pool, slot in self.vtw.find_port(addr, port)]

    def ids_for(self, creatorid: int) -> list[State]:
        """Every state made by one creator."""
        return list(self._by_id.get(creatorid, {}).values())

    # ---- timeouts and purge ----------------------------------------------------------

    def expires_at(self, st: State) -> float:
        """pf_state_expires(): when ``st`` expires at the table's current size."""
        if st.timeout >= tmo.PFTM_MAX:
            # TIME_WAIT's expiry is absolute; an unlinked state is already gone.
            return st.expire if st.timeout == tmo.TIME_WAIT else float("-inf")
        scale = tmo.adaptive_scale(self.timeouts, self.count)
        if scale is None:
            return st.expire
        return st.expire + self.timeouts[st.timeout] * scale

    def purge(self, now: float, maxcheck: int | None = None) -> int:
        """Remove expired states, looking at no more than ``maxcheck`` states.

        Called once a second, the default bound (1 + states / interval) sweeps the whole
        table once per ``interval`` seconds, as pf does, so no single call stalls packets.
        VTW records are expired too (from each pool's oldest, so only due ones are looked
        at). Returns how many states and records were removed.
        """
        if maxcheck is None:
            maxcheck = 1 + self.count // max(1, self.timeouts[tmo.INTERVAL])
        # Seconds each timeout id adds to State.expire. Pseudo-timeouts add nothing:
        # TIME_WAIT's expire is absolute, UNLINKED states are skipped below.
        lifetimes = [0.0] * tmo.TIMEOUT_IDS
        scale = tmo.adaptive_scale(self.timeouts, self.count)
        if scale is not None:
            lifetimes[: tmo.PFTM_MAX] = [t * scale for t in self.timeouts]
        removed = self.vtw.expire(now)
        queue, pos = self._purge_queue, self._purge_pos
        rebuilt = False
        while maxcheck > 0:
            if pos >= len(queue):
                if rebuilt:
                    break  # one full sweep per call at most
                queue = [st for tab in self._by_proto.values() for st in tab.values()]
                pos, rebuilt = 0, True
            end = min(len(queue), pos + maxcheck)
            maxcheck -= end - pos
            for i in range(pos, end):
                st = queue[i]
                timeout = st.timeout
                if timeout != _UNLINKED and st.expire + lifetimes[timeout] <= now:
                    self.remove(st, RemoveReason.EXPIRED)
                    removed += 1
            pos = end
        self._purge_queue, self._purge_pos = queue, pos
        return removed

    # ---- administration --------------------------------------------------------------

    def kill(self, st: State) -> None:
        """Remove one state on an operator's request."""
        self.remove(st, RemoveReason.KILLED)

    def clear(
        self,
        creatorid: int | None = None,
        reason: RemoveReason = RemoveReason.FLUSHED,
        origin: Origin = Origin.LOCAL,
    ) -> int:
        """Remove every state and VTW record (of one creator, if given); returns how many.

        ``origin`` is PEER for a sync peer's CLR (its events are then not sent back).
        """
        self._origin = origin
        try:
            victims = self.ids_for(creatorid) if creatorid is not None else list(self.states())
            for st in victims:
                self.remove(st, reason)
            records = self.kill_vestigial(
                lambda rec: creatorid is None or rec.creatorid == creatorid, reason
            )
        finally:
            self._origin = Origin.LOCAL
        return len(victims) + records

    def block_malformed(self, reason: int) -> None:
        """Count a frame the decoder rejected (``short``, ``bad-offset``, ``fragment``:
        a PFRES index) as blocked for that reason; it never reaches :meth:`test`."""
        self.pfres[reason] += 1
        self.blocked += 1

    def set_timeout(self, timeout: int, seconds: int) -> None:
        """Set one pf timeout (a PFTM_* id below ``PFTM_MAX``) in seconds (or states,
        for the adaptive ones); applies to every state from the next lookup or purge."""
        if not 0 <= timeout < tmo.PFTM_MAX:
            raise ValueError(f"no timeout with id {timeout}")
        if not 0 <= seconds <= tmo.TIMEOUT_MAX:
            raise ValueError(f"timeout {tmo.NAMES[timeout]} must be in 0..{tmo.TIMEOUT_MAX}")
        self.timeouts[timeout] = seconds

    def set_limit_states(self, limit: int) -> None:
        """Set the hard limit of full states; states above a lowered limit stay."""
        if not LIMIT_STATES_MIN <= limit <= LIMIT_STATES_MAX:
            raise ValueError(f"limit must be in {LIMIT_STATES_MIN}..{LIMIT_STATES_MAX}")
        self.limit_states = limit

    def set_mslt(self, **changes: bool | int) -> None:
        """Change MSLT settings (``enable``, ``loopback``, ``local``, ``remote``; see
        :class:`statetable.mslt.MsltConfig`), validated; classified states keep their class."""
        unknown = changes.keys() - MsltConfig.model_fields.keys()
        if unknown:
            raise ValueError(f"unknown MSLT settings: {sorted(unknown)}")
        config = self.mslt.config.model_dump() | changes
        self.mslt.config = MsltConfig.model_validate(config)

    def clear_counters(self) -> None:
        """pfctl -F info: zero the PFRES and state-table counters."""
        self.pfres = [0] * len(PFRES_NAMES)
        self.fcounters = [0, 0, 0]
        self.passed = self.blocked = 0
        self.stats = ProtoStats()

    def new_id(self) -> int:
        """Reserve a state id of this host (for states built outside ``test``)."""
        self._next_id += 1
        return self._next_id - 1


def _seq_after(a: int, b: int) -> bool:
    """TCP sequence comparison: `a` comes after `b` (modulo 2**32)."""
    return 0 < (a - b) & 0xFFFFFFFF < 0x80000000
