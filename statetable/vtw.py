"""Vestigial TIME_WAIT (NetBSD's VTW): compact records for connections in TIME_WAIT.

A connection in TIME_WAIT only has to recognise late segments (see
:mod:`statetable.timewait`) and be replicated; it needs none of the rest of a State.
So it leaves the main table and becomes a *record* in a pool.

Pools
    One pool per (address family, MSLT class), made on first use. A pool is a set of
    preallocated flat arrays (``array``/``bytearray``), one element per slot: no Python
    object per record, so records cost their bytes only and the garbage collector never
    sees them. Slots are referenced by narrow index: 16 bits up to 65536 slots. Slot 0 is
    the nil index, so a pool of N slots holds N - 1 records.

    Per slot (IPv4): key 12 B, id 8, creator index 2, both peers' seqlo/seqhi 16,
    max_win 4, wscale with the peer's state bits 2, expiry 4, key-hash tag 1, three
    hashes 11 (bucket head + chain link each; the id hash has half a head per slot), age
    list 4 (older + newer link): 64 bytes. IPv6 keys add 24. (Above 65,536 slots the
    index arrays are 32-bit: 77.5 bytes.)

    A pool starts with INITIAL_SLOTS slots and doubles, records and all, when it is full
    and below net.inet.tcp.vtw.entries; so memory follows the records held, and the
    largest setting costs nothing until connections fill it.

Age order
    Every record of a pool has the same lifetime (its class's 2 x MSL), so insertion
    order is expiry order. Live records form a doubly linked list from ``oldest`` to
    ``newest``; free slots a singly linked free list (through ``newer``). Insertion
    appends, expiry pops from ``oldest`` while due, a restarted timer moves the record to
    the newest end, and when no slot is free the oldest record is evicted
    ("assassinated", counted as ``kill``). All O(1); a freed slot is reusable at once, so
    a pool evicts only when it really holds N - 1 records. (If an MSL is changed at run
    time, records made before the change may expire after later ones; lookups check
    expiry exactly, so a due record is never matched, only reclaimed a little late.)

Expiry
    Stored as uint32 ticks of 1/1024 s from the pool's ``base``. The table rounds every
    TIME_WAIT expiry up to a tick (:func:`quantize`) in both VTW modes, so a record's
    expiry is exactly the full state's. A pool whose records no longer fit its 48-day
    tick range is rebuilt around the new time (see :meth:`Vtw.insert`).

Hashes
    Three chained hashes over the pool's slots, each a bucket-head array and a per-slot
    link array: by full key (``lookup_connect``), by the initiator's endpoint, address
    and port (``lookup_port``, NetBSD's local-port hash: "is this source port still held
    by a TIME_WAIT connection?"), and by sync identity (id, creatorid), for peers that
    delete a record by name. Buckets = slots (id hash: slots / 2), so chains average
    about one record; bench/bench_vtw_hash.py measures this design against NetBSD's
    fat-pointer buckets. Invariants (checked by :meth:`Pool.check`): exactly the live
    records are chained, each once per hash.

Statistics are NetBSD's: ins, del, kill and, per hash, look/hit/miss/probe/losing
(records compared that were not the one sought) and the maxima of chain length, probes
and losses per lookup.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NoReturn

from pydantic import BaseModel, Field, field_validator

from statetable import keys
from statetable.events import RemoveReason
from statetable.mslt import CLASS_NAMES, class_flags
from statetable.state import FIN_WAIT_2, FLAG_NOSYNC, TIME_WAIT, U16, State

# Pool.peer bits beside pf's wscale encoding (0x80 | shift).
WSCALE_BITS = 0x8F
PEER_TIME_WAIT = 0x10
PEER_NOSYNC = 0x20
# Expiries are kept in ticks of 1/1024 s (a power of two: conversions are exact).
TICKS = 1024
# Slots a new pool starts with; it doubles when full, up to net.inet.tcp.vtw.entries, so
# memory follows the records held, not the configured maximum.
INITIAL_SLOTS = 1024
# Half the uint32 tick range: a new pool's base sits this far before its first expiry.
_HALF_RANGE = 1 << 31


def quantize(when: float) -> float:
    """``when`` rounded up to a tick: the expiry a record can hold exactly."""
    return math.ceil(when * TICKS) / TICKS


# Range of net.inet.tcp.vtw.entries (most slots per pool, a power of two). Pools grow by
# doubling, and a doubling relinks every record (~2-7 us each): 2**20 bounds the last one
# to ~0.5M records (a few seconds, once) and a full pool to 64 MB (IPv4).
ENTRIES_MIN = 4
ENTRIES_MAX = 1 << 20


class VtwConfig(BaseModel):
    """The net.inet.tcp.vtw.* knobs."""

    enable: bool = True
    # Slots per pool (a power of two); each pool holds entries - 1 records.
    entries: int = Field(65536, ge=ENTRIES_MIN, le=ENTRIES_MAX)

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
        self.look = self.hit = self.miss = self.probe = self.losing = 0
        self.max_chain = self.max_probe = self.max_loss = 0

    def items(self) -> list[tuple[str, int]]:
        """(name, value) in NetBSD's order."""
        return [(name, getattr(self, name)) for name in self.FIELDS]

    def record(self, found: bool, probes: int, losses: int) -> None:
        """Count one lookup that visited ``probes`` records, ``losses`` of them in vain."""
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


class PoolCorruption(RuntimeError):
    """A pool's links contradict each other (found by :meth:`Pool.check` or an unlink)."""


class Pool:
    """The records of one (family, class): flat arrays indexed by slot (see module doc)."""

    # The arrays, (re)built by _allocate.
    keys: bytearray
    _view: memoryview
    tags: bytearray
    ids: array[int]
    creator: array[int]
    seqlo: array[int]
    seqhi: array[int]
    max_win: array[int]
    peer: array[int]
    expire: array[int]
    older: array[int]
    newer: array[int]
    key_heads: array[int]
    key_next: array[int]
    port_heads: array[int]
    port_next: array[int]
    id_heads: array[int]
    id_next: array[int]

    def __init__(
        self,
        af: int,
        cls: int,
        entries: int,
        stats: VtwStats,
        base: int,
        slots: int | None = None,
    ) -> None:
        if entries & (entries - 1) or entries < ENTRIES_MIN:
            raise ValueError(f"pool entries must be a power of two >= {ENTRIES_MIN}")
        self.af = af
        self.cls = cls
        self.limit = entries  # slots the pool may grow to
        self.stats = stats
        self.base = base  # tick that stored expiries count from
        self.keylen = 12 if af == 4 else 36
        self.creator_ids: list[int] = []
        self._creator_index: dict[int, int] = {}
        self.oldest = self.newest = 0
        self.live = 0
        self.size = 0
        self._allocate(min(entries, INITIAL_SLOTS) if slots is None else slots)

    def _allocate(self, size: int) -> None:
        """(Re)build every array at ``size`` slots, keeping the records of slots below the
        old size; the hash chains are rebuilt and the new slots join the free list."""
        old = self.size
        self.size = size
        self.mask = size - 1
        self.key_mask = self.mask  # buckets of the full-key hash, minus one
        # The (id, creatorid) hash has half as many buckets (chains of ~2 at full load):
        # it serves peers' deletes, not the packet path, and saves a byte per slot.
        self.id_mask = (size >> 1) - 1
        kl = self.keylen
        index = "H" if size <= 0x10000 else "I"

        # array(code, [0]) * n allocates exactly n items (array(code, bytes) and extend
        # over-allocate by 1/16); a grown array gets the old one's items in front.
        def fresh(code: str, per_slot: int = 1) -> array[int]:
            return array(code, [0]) * (per_slot * size)

        def grown(code: str, items: array[int], per_slot: int = 1) -> array[int]:
            new = fresh(code, per_slot)
            # Index arrays widen from 16 to 32 bits past 65,536 slots.
            new[: len(items)] = items if items.typecode == code else array(code, items)
            return new

        keys_ = bytearray(size * kl)
        tags = bytearray(size)
        if old:
            self._view.release()  # a bytearray with an exported view cannot be replaced
            keys_[: old * kl] = self.keys
            tags[:old] = self.tags
            self.ids = grown("Q", self.ids)
            self.creator = grown("H", self.creator)
            self.seqlo = grown("I", self.seqlo, 2)
            self.seqhi = grown("I", self.seqhi, 2)
            self.max_win = grown("H", self.max_win, 2)
            self.peer = grown("B", self.peer, 2)
            self.expire = grown("I", self.expire)
            self.older = grown(index, self.older)
            self.newer = grown(index, self.newer)
        else:
            self.ids = fresh("Q")
            # creatorids are few (one per node of a mesh): a record keeps a 16-bit index
            # into this pool's list of them.
            self.creator = fresh("H")
            # Peer fields interleaved: [2 * slot] is the source side, [2 * slot + 1] the
            # other.
            self.seqlo = fresh("I", 2)
            self.seqhi = fresh("I", 2)
            self.max_win = fresh("H", 2)
            # pf's wscale byte (0x80 | shift) with two spare bits used: PEER_TIME_WAIT
            # (the peer is TIME_WAIT, else FIN_WAIT_2: a record's peers are never anything
            # else) and, on the source side, PEER_NOSYNC (the state's NOSYNC flag).
            self.peer = fresh("B", 2)
            self.expire = fresh("I")
            self.older = fresh(index)
            # Live slots: the next newer record; free slots: the next free slot.
            self.newer = fresh(index)
        self.keys = keys_
        self._view = memoryview(self.keys)  # slices of it copy once, not twice
        # One byte of each record's key hash, checked before its key: a chained lookup
        # then rarely touches the (large, cold) key array of a record it does not want.
        self.tags = tags
        self.key_heads = fresh(index)
        self.key_next = fresh(index)
        self.port_heads = fresh(index)
        self.port_next = fresh(index)
        self.id_heads = array(index, [0]) * (size >> 1)
        self.id_next = fresh(index)
        slot = self.oldest
        while slot:
            self._link(slot, self._key_at(slot))
            slot = self.newer[slot]
        # Slot 0 is nil; the new slots (all but 0 at first) form the free list in order.
        first = max(old, 1)
        self.newer[first : size - 1] = array(index, range(first + 1, size))
        self.newer[size - 1] = 0
        self.free = first

    @property
    def capacity(self) -> int:
        """Records this pool can hold once grown to its limit (slot 0 is nil)."""
        return self.limit - 1

    @property
    def nbytes(self) -> int:
        """Bytes of the pool's arrays (as allocated so far)."""
        arrays = (
            self.ids,
            self.creator,
            self.seqlo,
            self.seqhi,
            self.max_win,
            self.peer,
            self.expire,
            self.key_heads,
            self.key_next,
            self.port_heads,
            self.port_next,
            self.id_heads,
            self.id_next,
            self.older,
            self.newer,
        )
        return len(self.keys) + len(self.tags) + sum(a.itemsize * len(a) for a in arrays)

    def fits(self, expire: float) -> bool:
        """Whether an expiry (seconds) is within this pool's tick range."""
        return 0 <= int(expire * TICKS) - self.base <= 0xFFFFFFFF

    def expire_at(self, slot: int) -> float:
        """A record's expiry in seconds."""
        return (self.expire[slot] + self.base) / TICKS

    # ---- hashing ---------------------------------------------------------------------

    def _key_at(self, slot: int) -> bytes:
        o = slot * self.keylen
        return bytes(self._view[o : o + self.keylen])

    def _port_bucket(self, addr: bytes, port: int) -> int:
        # hash(initiator address) + port: an initiator's consecutive ports land in
        # consecutive buckets.
        return (hash(addr) + port) & self.mask

    def _key_port_bucket(self, key: bytes) -> int:
        n = (self.keylen - 4) >> 1
        return self._port_bucket(key[:n], key[n + n] << 8 | key[n + n + 1])

    def _id_bucket(self, id: int, creatorid: int) -> int:
        return (id ^ creatorid) & self.id_mask

    # The per-record paths below (link, unlink, lookup, insert, release) run for every
    # closed connection and every new SYN (bench/bench_vtw.py): they index arrays
    # directly and call few helpers, since a Python call costs about what a few array
    # operations do.

    def _link(self, slot: int, key: bytes) -> None:
        h = hash(key)
        self.tags[slot] = h >> 56 & 0xFF  # high bits: the bucket uses the low ones
        bucket = h & self.key_mask
        self.key_next[slot] = self.key_heads[bucket]
        self.key_heads[bucket] = slot
        bucket = self._key_port_bucket(key)
        self.port_next[slot] = self.port_heads[bucket]
        self.port_heads[bucket] = slot
        bucket = self._id_bucket(self.ids[slot], self.creator_ids[self.creator[slot]])
        self.id_next[slot] = self.id_heads[bucket]
        self.id_heads[bucket] = slot

    @staticmethod
    def _unchain(heads: array[int], links: array[int], bucket: int, slot: int) -> None:
        """Take ``slot`` out of a bucket's chain; PoolCorruption if it is not there."""
        i = heads[bucket]
        if i == slot:
            heads[bucket] = links[slot]
        else:
            while i and links[i] != slot:
                i = links[i]
            if not i:
                raise PoolCorruption(f"slot {slot} is not in the chain of bucket {bucket}")
            links[i] = links[slot]
        links[slot] = 0

    def _unlink(self, slot: int) -> None:
        key = self._key_at(slot)
        self._unchain(self.key_heads, self.key_next, hash(key) & self.key_mask, slot)
        self._unchain(self.port_heads, self.port_next, self._key_port_bucket(key), slot)
        bucket = self._id_bucket(self.ids[slot], self.creator_ids[self.creator[slot]])
        self._unchain(self.id_heads, self.id_next, bucket, slot)

    def lookup(self, key: bytes) -> int:
        """The slot of the record with this exact key, or 0 (counted in lookup_connect)."""
        stats = self.stats.connect
        h = hash(key)
        i = self.key_heads[h & self.key_mask]
        if not i:
            stats.look += 1  # the common case: an empty bucket
            stats.miss += 1
            return 0
        tag = h >> 56 & 0xFF
        tags = self.tags
        kl = self.keylen
        buf = self.keys
        links = self.key_next
        probes = losses = 0
        while i:
            probes += 1
            if tags[i] == tag:
                o = i * kl
                if buf[o : o + kl] == key:
                    stats.record(True, probes, losses)
                    return i
                losses += 1  # the tag matched, the key did not
            i = links[i]
        stats.record(False, probes, losses)
        if probes > stats.max_chain:  # a miss walked the whole chain
            stats.max_chain = probes
        return 0

    def lookup_port(self, addr: bytes, port: int) -> list[int]:
        """Slots of records whose initiator is ``addr:port`` (counted in lookup_port)."""
        n = (self.keylen - 4) >> 1
        if len(addr) != n:
            return []
        want = port.to_bytes(2, "big")
        links = self.port_next
        i = self.port_heads[self._port_bucket(addr, port)]
        found: list[int] = []
        probes = losses = 0
        kl = self.keylen
        buf = self.keys
        while i:
            probes += 1
            o = i * kl
            if buf[o : o + n] == addr and buf[o + n + n : o + n + n + 2] == want:
                found.append(i)
            else:
                losses += 1
            i = links[i]
        stats = self.stats.port
        stats.record(bool(found), probes, losses)
        if probes > stats.max_chain:  # a port lookup always walks the chain
            stats.max_chain = probes
        return found

    def find_id(self, id: int, creatorid: int) -> int:
        """The slot of the record with this sync identity, or 0 (not counted: NetBSD has
        no such lookup)."""
        creator = self._creator_index.get(creatorid)
        if creator is None:
            return 0
        i = self.id_heads[self._id_bucket(id, creatorid)]
        ids, creators, links = self.ids, self.creator, self.id_next
        while i:
            if ids[i] == id and creators[i] == creator:
                return i
            i = links[i]
        return 0

    # ---- the age list ----------------------------------------------------------------

    def _append(self, slot: int) -> None:
        """Make ``slot`` the newest record."""
        self.older[slot] = self.newest
        self.newer[slot] = 0
        if self.newest:
            self.newer[self.newest] = slot
        else:
            self.oldest = slot
        self.newest = slot

    def _detach(self, slot: int) -> None:
        """Take ``slot`` out of the age list."""
        older, newer = self.older[slot], self.newer[slot]
        if older:
            self.newer[older] = newer
        else:
            self.oldest = newer
        if newer:
            self.older[newer] = older
        else:
            self.newest = older

    def _release(self, slot: int) -> None:
        """Unchain a live record, take it out of the age list, and free its slot."""
        self._unlink(slot)
        self._detach(slot)
        self.newer[slot] = self.free
        self.free = slot
        self.live -= 1

    # ---- records ---------------------------------------------------------------------

    def insert(
        self, st: State, expire: float, now: float, on_remove: OnRemove, moved: bool = False
    ) -> int:
        """Store a state's TIME_WAIT essentials in a new record, the newest; returns its
        slot, or 0 when the pool cannot name the state's creator (65,536 of them).

        Records due at ``now`` are freed first (so a pool holds the connections in
        TIME_WAIT, not those awaiting the next purge); then, when no slot is free, the
        pool doubles if it is below its limit, else the oldest record is evicted. Both
        peers must be FIN_WAIT_2 or TIME_WAIT, and ``expire`` must fit the pool
        (:meth:`fits`). ``moved``: the record comes from another pool (not an ``ins``).
        """
        creator = self._creator_index.get(st.creatorid)
        if creator is None:
            if len(self.creator_ids) > 0xFFFF:
                return 0
            creator = self._creator_index[st.creatorid] = len(self.creator_ids)
            self.creator_ids.append(st.creatorid)
        if self.oldest:
            self.expire_due(now, on_remove)
        slot = self.free
        if not slot:
            if self.size < self.limit:
                self._allocate(self.size * 2)
                slot = self.free
            else:
                slot = self.oldest
                self.stats.kill += 1
                on_remove(self, slot, RemoveReason.EVICTED)
                self._release(slot)
        self.free = self.newer[slot]
        self._append(slot)
        self.live += 1
        key = st.key
        o = slot * self.keylen
        self.keys[o : o + self.keylen] = key
        self.ids[slot] = st.id
        self.creator[slot] = creator
        s = slot + slot
        d = st.dst
        self.seqlo[s] = st.seqlo
        self.seqlo[s + 1] = d.seqlo
        self.seqhi[s] = st.seqhi
        self.seqhi[s + 1] = d.seqhi
        self.max_win[s] = st.max_win
        self.max_win[s + 1] = d.max_win
        self.peer[s] = (
            st.wscale
            | (PEER_TIME_WAIT if st.state == TIME_WAIT else 0)
            | (PEER_NOSYNC if st.flags & FLAG_NOSYNC else 0)
        )
        self.peer[s + 1] = d.wscale | (PEER_TIME_WAIT if d.state == TIME_WAIT else 0)
        self.expire[slot] = int(expire * TICKS) - self.base
        self._link(slot, key)
        if not moved:
            self.stats.ins += 1
        return slot

    def free_record(self, slot: int) -> None:
        """Remove a live record (counted as ``del``)."""
        self._release(slot)
        self.stats.dels += 1

    def restart(self, slot: int, expire: float) -> None:
        """Give a record a new (later) expiry: it becomes the newest."""
        if slot != self.newest:
            self._detach(slot)
            self._append(slot)
        self.expire[slot] = int(expire * TICKS) - self.base

    def expire_due(self, now: float, on_remove: OnRemove) -> int:
        """Free records due at ``now``, from the oldest; returns how many."""
        freed = 0
        due = now * TICKS - self.base  # exact: TICKS is a power of two
        expire = self.expire
        while self.oldest and expire[self.oldest] <= due:
            slot = self.oldest
            on_remove(self, slot, RemoveReason.EXPIRED)
            self.free_record(slot)
            freed += 1
        return freed

    def slots(self) -> Iterator[int]:
        """Live slots, oldest first (a snapshot)."""
        found = []
        slot = self.oldest
        while slot:
            found.append(slot)
            slot = self.newer[slot]
        return iter(found)

    # ---- invariants ------------------------------------------------------------------

    def check(self) -> None:
        """Raise PoolCorruption unless the pool is consistent (tcp_vtw.c's KASSERTs, all
        at once; O(size), for tests): the age list and the free list partition the
        slots 1..size-1, ``live`` counting the records, older and newer links agreeing;
        every record sits exactly once in each hash, in the bucket its key (or id and
        creatorid) selects, and no free slot is chained; tags match the key hashes.
        (Expiries are uint32 ticks from ``base``: in range by construction.)"""

        def fail(what: str) -> NoReturn:
            raise PoolCorruption(f"ipv{self.af} class {self.cls}: {what}")

        live: list[int] = []
        seen: set[int] = set()
        slot, older = self.oldest, 0
        while slot:
            if slot in seen or not 0 < slot < self.size:
                fail(f"age list revisits or leaves the pool at slot {slot}")
            if self.older[slot] != older:
                fail(f"slot {slot}'s older link is {self.older[slot]}, not {older}")
            seen.add(slot)
            live.append(slot)
            slot, older = self.newer[slot], slot
        if older != self.newest:
            fail(f"the age list ends at {older}, newest is {self.newest}")
        if len(live) != self.live:
            fail(f"{len(live)} records in the age list, live says {self.live}")
        slot = self.free
        while slot:
            if slot in seen or not 0 < slot < self.size:
                fail(f"free list revisits, leaves the pool or meets a record at slot {slot}")
            seen.add(slot)
            slot = self.newer[slot]
        if len(seen) != self.size - 1:
            fail(f"age and free lists cover {len(seen)} of {self.size - 1} slots")
        buckets = {
            "key": [hash(self._key_at(s)) & self.key_mask for s in live],
            "port": [self._key_port_bucket(self._key_at(s)) for s in live],
            "id": [self._id_bucket(self.ids[s], self.creator_of(s)) for s in live],
        }
        chains = (
            ("key", self.key_heads, self.key_next),
            ("port", self.port_heads, self.port_next),
            ("id", self.id_heads, self.id_next),
        )
        for name, heads, links in chains:
            chained: dict[int, int] = {}
            for bucket in range(len(heads)):
                slot, steps = heads[bucket], 0
                while slot:
                    if slot in chained or steps > self.live:
                        fail(f"slot {slot} is twice in the {name} hash (or a chain loops)")
                    chained[slot] = bucket
                    slot, steps = links[slot], steps + 1
            if sorted(chained) != sorted(live):
                fail(f"the {name} hash chains {len(chained)} slots, {len(live)} are live")
            for slot, bucket in zip(live, buckets[name], strict=True):
                if chained[slot] != bucket:
                    fail(f"slot {slot} is in {name} bucket {chained[slot]}, not {bucket}")
        for slot in live:
            if self.tags[slot] != hash(self._key_at(slot)) >> 56 & 0xFF:
                fail(f"slot {slot}'s tag does not match its key")

    # ---- reading records -------------------------------------------------------------

    def key(self, slot: int) -> bytes:
        """A record's key."""
        return self._key_at(slot)

    def creator_of(self, slot: int) -> int:
        """A record's creatorid."""
        return self.creator_ids[self.creator[slot]]

    def _peer_state(self, side: int) -> int:
        return TIME_WAIT if self.peer[side] & PEER_TIME_WAIT else FIN_WAIT_2

    def view(self, slot: int) -> Vestigial:
        """A copy of a record."""
        s = slot + slot
        peers = [
            PeerView(
                self._peer_state(i),
                self.seqlo[i],
                self.seqhi[i],
                self.max_win[i],
                self.peer[i] & WSCALE_BITS,
            )
            for i in (s, s + 1)
        ]
        return Vestigial(
            self._key_at(slot),
            self.ids[slot],
            self.creator_of(slot),
            peers[0],
            peers[1],
            self.expire_at(slot),
            self.cls,
        )

    def to_state(self, slot: int) -> State:
        """A full State rebuilt from a record (traffic counters are not kept: zero).

        Its ``expire`` is the record's absolute expiry and its creation time is unknown,
        so it is set to the expiry too.
        """
        when = self.expire_at(slot)
        st = State(self._key_at(slot), 6, self.ids[slot], self.creator_of(slot), when)
        s = slot + slot
        for side, peer in ((s, st), (s + 1, st.dst)):
            peer.seqlo = self.seqlo[side]
            peer.seqhi = self.seqhi[side]
            peer.max_win = U16[self.max_win[side]]
            peer.wscale = self.peer[side] & WSCALE_BITS
            peer.state = self._peer_state(side)
        st.flags = class_flags(self.cls) | (FLAG_NOSYNC if self.peer[s] & PEER_NOSYNC else 0)
        return st


class Vtw:
    """All pools, the lookup order across them, and the statistics."""

    def __init__(self, config: VtwConfig | None = None) -> None:
        config = config or VtwConfig(enable=True, entries=65536)
        self.enabled = config.enable
        self.entries = config.entries
        self.stats = VtwStats()
        # (af, cls) -> Pool; per family, the pools in class order for lookups.
        self.pools: dict[tuple[int, int], Pool] = {}
        self._by_af: dict[int, list[Pool]] = {4: [], 6: []}
        # Records in all pools; the packet path tests this before any lookup. Kept here,
        # where records arrive (insert) and leave (_removed, dropped pools).
        self.live = 0
        # Told about every record that leaves (the table turns it into an event).
        self.on_remove: OnRemove = _ignore

    def _removed(self, pool: Pool, slot: int, reason: RemoveReason) -> None:
        """Every pool reports a record leaving here, before it frees the slot."""
        self.live -= 1
        self.on_remove(pool, slot, reason)

    def _new_pool(self, af: int, cls: int, expire: float) -> Pool:
        pool = Pool(af, cls, self.entries, self.stats, int(expire * TICKS) - _HALF_RANGE)
        old = self.pools.get((af, cls))
        self.pools[(af, cls)] = pool
        pools = [p for p in self._by_af[af] if p is not old] + [pool]
        self._by_af[af] = sorted(pools, key=lambda p: p.cls)
        return pool

    def insert(
        self, st: State, cls: int, expire: float, now: float = -math.inf, moved: bool = False
    ) -> bool:
        """Make ``st`` (in TIME_WAIT) a record of class ``cls`` expiring at ``expire``
        (a :func:`quantize`-d time); False if its pool cannot take it (see Pool.insert).
        ``moved``: the record only changes pools (not counted as an insert)."""
        af = keys.family(st.key)
        pool = self.pools.get((af, cls))
        if pool is None:
            pool = self._new_pool(af, cls, expire)
        elif not pool.fits(expire):
            pool = self._rebuild(pool, expire)
        if not pool.insert(st, expire, now, self._removed, moved):
            return False
        self.live += 1
        return True

    def _rebuild(self, old: Pool, expire: float) -> Pool:
        """A fresh pool centred on ``expire`` (after ~24 days of ticks), records moved;
        records too old to fit are long due and are freed."""
        pool = self._new_pool(old.af, old.cls, expire)
        self.live -= old.live  # they leave with the old pool; those that fit come back
        for slot in old.slots():
            when = old.expire_at(slot)
            if pool.fits(when):
                self.live += 1
                pool.insert(old.to_state(slot), when, -math.inf, self._removed, moved=True)
            else:
                self.on_remove(old, slot, RemoveReason.EXPIRED)
                self.stats.dels += 1
        return pool

    def find(self, key: bytes, rkey: bytes) -> tuple[Pool, int, bool] | None:
        """(pool, slot, packet-is-from-the-initiator) for a packet's key, or None."""
        for pool in self._by_af[keys.family(key)]:
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
        af = 4 if len(addr) == 4 else 6  # an address, not a key
        return [
            (pool, slot)
            for pool in self._by_af[af]
            if pool.live
            for slot in pool.lookup_port(addr, port)
        ]

    def find_id(self, id: int, creatorid: int) -> tuple[Pool, int] | None:
        """(pool, slot) of the record with this sync identity, or None."""
        for pool in self.pools.values():
            if pool.live:
                slot = pool.find_id(id, creatorid)
                if slot:
                    return pool, slot
        return None

    def remove(self, pool: Pool, slot: int, reason: RemoveReason) -> None:
        """Free one live record, telling ``on_remove`` first."""
        self._removed(pool, slot, reason)
        pool.free_record(slot)

    def restart(self, pool: Pool, slot: int, expire: float) -> None:
        """Restart a record's TIME_WAIT timer: it expires at ``expire`` (quantized)."""
        if not pool.fits(expire):
            key = pool.key(slot)
            pool = self._rebuild(pool, expire)
            slot = pool.lookup(key)  # found: it was not due, so it moved
        if slot:
            pool.restart(slot, expire)

    def expire(self, now: float) -> int:
        """Free every record due at ``now``; returns how many."""
        if not self.live:
            return 0
        return sum(pool.expire_due(now, self._removed) for pool in list(self.pools.values()))

    def records(self) -> Iterator[tuple[Pool, int]]:
        """(pool, slot) of every live record, pool by pool, oldest first (a snapshot)."""
        for pool in list(self.pools.values()):
            yield from [(pool, slot) for slot in pool.slots()]

    def drain(self) -> list[State]:
        """Remove every record (counted as ``del``, no events: the connections live on as
        the returned full States) and drop the pools."""
        states = [pool.to_state(slot) for pool, slot in self.records()]
        self.stats.dels += len(states)
        self._drop_pools()
        return states

    def _drop_pools(self) -> list[Pool]:
        """Forget every pool (their records with them); returns them."""
        old = list(self.pools.values())
        self.pools = {}
        self._by_af = {4: [], 6: []}
        self.live = 0
        return old

    def resize(self, entries: int) -> None:
        """New pools of up to ``entries`` slots; records move over oldest first (the oldest
        are evicted when the new pools are smaller)."""
        old = self._drop_pools()
        self.entries = entries
        for pool in old:
            for slot in pool.slots():
                self.insert(pool.to_state(slot), pool.cls, pool.expire_at(slot), moved=True)

    def check(self) -> None:
        """Raise PoolCorruption unless every pool passes :meth:`Pool.check` and ``live``
        is their sum."""
        for pool in self.pools.values():
            pool.check()
        total = sum(pool.live for pool in self.pools.values())
        if total != self.live:
            raise PoolCorruption(f"pools hold {total} records, Vtw.live says {self.live}")

    def usage(self) -> list[tuple[str, int, int, int, int]]:
        """Per pool: (family/class name, in use, free, capacity, bytes)."""
        return [
            (f"ipv{af} {CLASS_NAMES[cls]}", p.live, p.capacity - p.live, p.capacity, p.nbytes)
            for (af, cls), p in sorted(self.pools.items())
        ]


def _ignore(pool: Pool, slot: int, reason: RemoveReason) -> None:
    pass
