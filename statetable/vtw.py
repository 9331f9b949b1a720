"""Vestigial TIME_WAIT (NetBSD's VTW): compact records for connections in TIME_WAIT.

A connection in TIME_WAIT only has to recognise late segments (see
:mod:`statetable.timewait`) and be replicated; it needs none of the rest of a State.
So it leaves the main table and becomes a *record* in a pool.

Pools
    One pool per (address family, MSLT class), made on first use and never resized in
    place. A pool is a set of preallocated flat arrays (``array``/``bytearray``), one
    element per slot: no Python object per record, so records cost their bytes only and
    the garbage collector never sees them. Slot 0 is the nil index, so a pool of N slots
    holds N - 1 records and indexes with 16 bits up to N = 65536 ("narrow index").

    Per record (IPv4): key 12 B, id 8, creatorid 4, both peers' seqlo/seqhi 16,
    max_win 4, wscale 2, peer state 2, expiry 8, and 2 x (bucket head + chain link)
    = 8 for the two hashes: 64 bytes. IPv6 keys add 24.

Age order
    Every record of a pool has the same lifetime (its class's 2 x MSL), so allocation
    order is expiry order. Slots are handed out as a ring: ``oldest`` is the ring's tail,
    ``alloc`` the next slot to hand out, ``span`` how many slots lie between them (live
    records and holes left by records freed early). Expiry walks from ``oldest`` and stops
    at the first live record not yet due. When the ring is full the record at ``oldest``
    is evicted ("assassinated", counted as ``kill``). A restarted timer moves the record
    to the ring's head, keeping the order. (If an MSL is changed at run time, records
    made before the change may expire after later ones; lookups check expiry exactly,
    so a due record is never matched, only reclaimed a little late.)

Hashes
    Two chained hashes over the pool's slots, each a bucket-head array and a per-slot
    link array: by full key (``lookup_connect``) and by the initiator's endpoint,
    address and port (``lookup_port``, NetBSD's local-port hash: "is this source port
    still held by a TIME_WAIT connection?"). Buckets = slots, so chains average under
    one record; measured figures are in BENCHMARKS.md. Invariant: only live records are
    chained; a freed slot is unlinked from both hashes before it is marked dead.

Statistics are NetBSD's: ins, del, kill and, per hash, look/hit/miss/probe/losing
(records compared that were not the one sought) and the maxima of chain length, probes
and losses per lookup.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Callable, Iterator

from pydantic import BaseModel, Field, field_validator

from statetable import keys
from statetable.events import RemoveReason
from statetable.mslt import CLASS_NAMES, class_flags
from statetable.state import U16, State

DEAD = float("-inf")


class VtwConfig(BaseModel):
    """The net.inet.tcp.vtw.* knobs."""

    enable: bool = True
    # Slots per pool (a power of two); each pool holds entries - 1 records.
    entries: int = Field(65536, ge=4, le=1 << 24)

    @field_validator("entries")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"{value} is not a power of two")
        return value


class HashStats:
    """Counters of one hash (NetBSD's vtw_stats per lookup kind)."""

    FIELDS = ("look", "hit", "miss", "probe", "losing", "max_chain", "max_probe", "max_loss")
    __slots__ = FIELDS

    def __init__(self) -> None:
        for name in self.FIELDS:
            setattr(self, name, 0)

    def items(self) -> list[tuple[str, int]]:
        """(name, value) in NetBSD's order."""
        return [(name, getattr(self, name)) for name in self.FIELDS]

    def _lookup_done(self, found: bool, probes: int, losses: int) -> None:
        self.look += 1
        if found:
            self.hit += 1
        else:
            self.miss += 1
        self.probe += probes
        self.losing += losses
        if probes > self.max_probe:
            self.max_probe = probes
        if losses > self.max_loss:
            self.max_loss = losses


class VtwStats:
    """ins, del, kill and the two hashes' counters."""

    __slots__ = ("ins", "dels", "kill", "connect", "port")

    def __init__(self) -> None:
        self.ins = self.dels = self.kill = 0
        self.connect = HashStats()
        self.port = HashStats()


@dataclass(frozen=True, slots=True)
class PeerView:
    """One side of a vestigial record."""

    state: int
    seqlo: int
    seqhi: int
    max_win: int
    wscale: int


@dataclass(frozen=True, slots=True)
class Vestigial:
    """A copy of one record, for listings and the API (not used on the packet path)."""

    key: bytes
    id: int
    creatorid: int
    src: PeerView
    dst: PeerView
    expire: float
    cls: int

    @property
    def af(self) -> int:
        """4 or 6."""
        return keys.family(self.key)


# A removal callback: (pool, slot, reason), called while the record is still readable.
OnRemove = Callable[["Pool", int, RemoveReason], None]


class Pool:
    """The records of one (family, class): flat arrays indexed by slot (see module doc)."""

    def __init__(self, af: int, cls: int, entries: int, stats: VtwStats) -> None:
        if entries & (entries - 1) or entries < 4:
            raise ValueError("pool entries must be a power of two >= 4")
        self.af = af
        self.cls = cls
        self.size = entries
        self.stats = stats
        self.keylen = kl = 12 if af == 4 else 36
        self.mask = entries - 1
        index = "H" if entries <= 0x10000 else "I"
        self.keys = bytearray(entries * kl)
        self.ids = array("Q", bytes(8 * entries))
        self.creators = array("I", bytes(4 * entries))
        # Peer fields interleaved: [2 * slot] is the source side, [2 * slot + 1] the other.
        self.seqlo = array("I", bytes(8 * entries))
        self.seqhi = array("I", bytes(8 * entries))
        self.max_win = array("H", bytes(4 * entries))
        self.wscale = array("B", bytes(2 * entries))
        self.pstate = array("B", bytes(2 * entries))
        self.expire = array("d", [DEAD]) * entries
        width = array(index).itemsize * entries
        self.key_heads = array(index, bytes(width))
        self.key_next = array(index, bytes(width))
        self.port_heads = array(index, bytes(width))
        self.port_next = array(index, bytes(width))
        self.live = 0
        self.oldest = self.alloc = 1
        self.span = 0

    @property
    def capacity(self) -> int:
        """Records this pool can hold (slot 0 is nil)."""
        return self.size - 1

    @property
    def nbytes(self) -> int:
        """Bytes of the pool's arrays."""
        arrays = (self.ids, self.creators, self.seqlo, self.seqhi, self.max_win, self.wscale,
                  self.pstate, self.expire, self.key_heads, self.key_next, self.port_heads,
                  self.port_next)
        return len(self.keys) + sum(a.itemsize * len(a) for a in arrays)

    # ---- hashing ---------------------------------------------------------------------

    def _key_at(self, slot: int) -> bytes:
        o = slot * self.keylen
        return bytes(self.keys[o:o + self.keylen])

    def _port_bucket(self, key: bytes) -> int:
        n = (self.keylen - 4) >> 1
        return hash(key[:n] + key[n + n:n + n + 2]) & self.mask

    def _link(self, slot: int, key: bytes) -> None:
        for heads, links, bucket, stats in (
                (self.key_heads, self.key_next, hash(key) & self.mask, self.stats.connect),
                (self.port_heads, self.port_next, self._port_bucket(key), self.stats.port)):
            links[slot] = heads[bucket]
            heads[bucket] = slot
            chain = 0
            i = slot
            while i:
                chain += 1
                i = links[i]
            if chain > stats.max_chain:
                stats.max_chain = chain

    def _unlink(self, slot: int) -> None:
        key = self._key_at(slot)
        for heads, links, bucket in (
                (self.key_heads, self.key_next, hash(key) & self.mask),
                (self.port_heads, self.port_next, self._port_bucket(key))):
            i = heads[bucket]
            if i == slot:
                heads[bucket] = links[slot]
            else:
                while links[i] != slot:
                    i = links[i]
                links[i] = links[slot]
            links[slot] = 0

    def lookup(self, key: bytes) -> int:
        """The slot of the record with this exact key, or 0 (counted in lookup_connect)."""
        kl = self.keylen
        buf = self.keys
        links = self.key_next
        i = self.key_heads[hash(key) & self.mask]
        probes = 0
        while i:
            probes += 1
            o = i * kl
            if buf[o:o + kl] == key:
                self.stats.connect._lookup_done(True, probes, probes - 1)
                return i
            i = links[i]
        self.stats.connect._lookup_done(False, probes, probes)
        return 0

    def lookup_port(self, addr: bytes, port: int) -> list[int]:
        """Slots of records whose initiator is ``addr:port`` (counted in lookup_port)."""
        n = (self.keylen - 4) >> 1
        if len(addr) != n:
            return []
        want = addr + port.to_bytes(2, "big")
        links = self.port_next
        i = self.port_heads[hash(want) & self.mask]
        found: list[int] = []
        probes = losses = 0
        kl = self.keylen
        buf = self.keys
        while i:
            probes += 1
            o = i * kl
            if buf[o:o + n] == addr and buf[o + n + n:o + n + n + 2] == want[n:]:
                found.append(i)
            else:
                losses += 1
            i = links[i]
        self.stats.port._lookup_done(bool(found), probes, losses)
        return found

    # ---- slots -----------------------------------------------------------------------

    def _take_slot(self, on_remove: OnRemove) -> int:
        """The next ring slot, evicting the oldest record when the ring is full."""
        if self.span == self.size - 1:
            victim = self.oldest
            if self.expire[victim] != DEAD:
                self.stats.kill += 1
                on_remove(self, victim, RemoveReason.EVICTED)
                self._release(victim)
            self.oldest = victim + 1 if victim + 1 < self.size else 1
            self.span -= 1
        slot = self.alloc
        self.alloc = slot + 1 if slot + 1 < self.size else 1
        self.span += 1
        return slot

    def _release(self, slot: int) -> None:
        self._unlink(slot)
        self.expire[slot] = DEAD
        self.live -= 1

    def insert(self, st: State, expire: float, on_remove: OnRemove) -> int:
        """Store a state's TIME_WAIT essentials in a new record; returns its slot."""
        slot = self._take_slot(on_remove)
        o = slot * self.keylen
        self.keys[o:o + self.keylen] = st.key
        self.ids[slot] = st.id
        self.creators[slot] = st.creatorid
        s = slot + slot
        for side, peer in ((s, st), (s + 1, st.dst)):
            self.seqlo[side] = peer.seqlo
            self.seqhi[side] = peer.seqhi
            self.max_win[side] = peer.max_win
            self.wscale[side] = peer.wscale
            self.pstate[side] = peer.state
        self.expire[slot] = expire
        self._link(slot, st.key)
        self.live += 1
        self.stats.ins += 1
        return slot

    def free(self, slot: int) -> None:
        """Remove a live record (counted as ``del``)."""
        self._release(slot)
        self.stats.dels += 1

    def restart(self, slot: int, expire: float, on_remove: OnRemove) -> int:
        """Give a record a new expiry, moving it to the ring's head; returns its slot."""
        if slot == (self.alloc - 1 if self.alloc > 1 else self.size - 1):
            self.expire[slot] = expire              # already the newest
            return slot
        key = self._key_at(slot)
        self._release(slot)
        new = self._take_slot(on_remove)
        self.live += 1
        o = new * self.keylen
        self.keys[o:o + self.keylen] = key
        for a in (self.ids, self.creators):
            a[new] = a[slot]
        s, n = slot + slot, new + new
        for a in (self.seqlo, self.seqhi, self.max_win, self.wscale, self.pstate):
            a[n] = a[s]
            a[n + 1] = a[s + 1]
        self.expire[new] = expire
        self._link(new, key)
        return new

    def expire_due(self, now: float, on_remove: OnRemove) -> int:
        """Free records due at ``now``, walking from the oldest; returns how many."""
        freed = 0
        expire = self.expire
        while self.span:
            slot = self.oldest
            when = expire[slot]
            if when != DEAD:
                if when > now:
                    break
                on_remove(self, slot, RemoveReason.EXPIRED)
                self.free(slot)
                freed += 1
            self.oldest = slot + 1 if slot + 1 < self.size else 1
            self.span -= 1
        return freed

    def slots(self) -> Iterator[int]:
        """Live slots, oldest first."""
        slot = self.oldest
        for _ in range(self.span):
            if self.expire[slot] != DEAD:
                yield slot
            slot = slot + 1 if slot + 1 < self.size else 1

    # ---- reading records -------------------------------------------------------------

    def key(self, slot: int) -> bytes:
        """A record's key."""
        return self._key_at(slot)

    def view(self, slot: int) -> Vestigial:
        """A copy of a record."""
        s = slot + slot
        peers = [PeerView(self.pstate[i], self.seqlo[i], self.seqhi[i], self.max_win[i],
                          self.wscale[i]) for i in (s, s + 1)]
        return Vestigial(self._key_at(slot), self.ids[slot], self.creators[slot], peers[0],
                         peers[1], self.expire[slot], self.cls)

    def to_state(self, slot: int) -> State:
        """A full State rebuilt from a record (traffic counters are not kept: zero).

        Its ``expire`` is the record's absolute expiry and its creation time is unknown,
        so it is set to the expiry too.
        """
        when = self.expire[slot]
        st = State(self._key_at(slot), 6, self.ids[slot], self.creators[slot], when)
        s = slot + slot
        for side, peer in ((s, st), (s + 1, st.dst)):
            peer.seqlo = self.seqlo[side]
            peer.seqhi = self.seqhi[side]
            peer.max_win = U16[self.max_win[side]]
            peer.wscale = self.wscale[side]
            peer.state = self.pstate[side]
        st.flags = class_flags(self.cls)
        return st


class Vtw:
    """All pools, the lookup order across them, and the statistics."""

    def __init__(self, config: VtwConfig | None = None) -> None:
        config = config or VtwConfig()
        self.enabled = config.enable
        self.entries = config.entries
        self.stats = VtwStats()
        # (af, cls) -> Pool; per family, the pools in class order for lookups.
        self.pools: dict[tuple[int, int], Pool] = {}
        self._by_af: dict[int, list[Pool]] = {4: [], 6: []}
        # Records in all pools; the packet path tests this before any lookup.
        self.live = 0
        # Told about every record that leaves (the table turns it into an event).
        self.on_remove: OnRemove = _ignore

    def pool(self, af: int, cls: int) -> Pool:
        """The pool of a family and class, made on first use."""
        pool = self.pools.get((af, cls))
        if pool is None:
            pool = self.pools[(af, cls)] = Pool(af, cls, self.entries, self.stats)
            self._by_af[af].append(pool)
            self._by_af[af].sort(key=lambda p: p.cls)
        return pool

    def insert(self, st: State, cls: int, expire: float) -> None:
        """Make ``st`` (in TIME_WAIT) a record of class ``cls``."""
        pool = self.pool(keys.family(st.key), cls)
        before = pool.live
        pool.insert(st, expire, self.on_remove)
        self.live += pool.live - before

    def find(self, key: bytes, rkey: bytes) -> tuple[Pool, int, bool] | None:
        """(pool, slot, packet-is-from-the-initiator) for a packet's key, or None."""
        for pool in self._by_af[4 if len(key) == 12 else 6]:
            if pool.live:
                slot = pool.lookup(key)
                if slot:
                    return pool, slot, True
                slot = pool.lookup(rkey)
                if slot:
                    return pool, slot, False
        return None

    def find_port(self, addr: bytes, port: int) -> list[tuple[Pool, int]]:
        """Records whose initiator is ``addr:port``, in every pool of that family."""
        af = 4 if len(addr) == 4 else 6
        return [(pool, slot) for pool in self._by_af[af] if pool.live
                for slot in pool.lookup_port(addr, port)]

    def remove(self, pool: Pool, slot: int, reason: RemoveReason) -> None:
        """Free one live record, telling ``on_remove`` first."""
        self.on_remove(pool, slot, reason)
        pool.free(slot)
        self.live -= 1

    def restart(self, pool: Pool, slot: int, expire: float) -> None:
        """Restart a record's TIME_WAIT timer."""
        before = pool.live
        pool.restart(slot, expire, self.on_remove)
        self.live += pool.live - before

    def expire(self, now: float) -> int:
        """Free every record due at ``now``; returns how many."""
        if not self.live:
            return 0
        freed = sum(pool.expire_due(now, self.on_remove) for pool in self.pools.values())
        self.live -= freed
        return freed

    def records(self) -> Iterator[tuple[Pool, int]]:
        """(pool, slot) of every live record, pool by pool, oldest first (a snapshot)."""
        for pool in list(self.pools.values()):
            yield from [(pool, slot) for slot in pool.slots()]

    def drain(self) -> list[State]:
        """Remove every record without events, returning each as a full State."""
        states = [pool.to_state(slot) for pool, slot in self.records()]
        self.pools.clear()
        self._by_af = {4: [], 6: []}
        self.live = 0
        return states

    def resize(self, entries: int) -> None:
        """New pools of ``entries`` slots; records move over oldest first (the oldest are
        evicted when the new pools are smaller)."""
        old = list(self.pools.values())
        self.entries = entries
        self.pools = {}
        self._by_af = {4: [], 6: []}
        self.live = 0
        moved = 0
        for pool in old:
            for slot in list(pool.slots()):
                self.insert(pool.to_state(slot), pool.cls, pool.expire[slot])
                moved += 1
        self.stats.ins -= moved            # moving is not inserting

    def usage(self) -> list[tuple[str, int, int, int, int]]:
        """Per pool: (family/class name, in use, free, capacity, bytes)."""
        return [(f"ipv{af} {CLASS_NAMES[cls]}", p.live, p.capacity - p.live, p.capacity,
                 p.nbytes) for (af, cls), p in sorted(self.pools.items())]


def _ignore(pool: Pool, slot: int, reason: RemoveReason) -> None:
    pass
