"""VTW full-key hash: the chained hash of ``statetable.vtw.Pool`` against NetBSD's
fat-pointer hash (and two cheap variants of the chain), for IPv4 keys.

    python bench/bench_vtw_hash.py [--entries N] [--load F] [--seconds S] [--rounds R]
                                   [--fat-load L] [--designs a,b,...] [--seed N]

Every design is a real ``Pool``: the prototypes subclass it and replace only the
full-key hash (``_link``, ``_unlink``, ``lookup``), so records, the age list and the
port hash are the same code and ``insert``/``free_record`` time the whole record path.

chain
    ``statetable.vtw.Pool`` as it is: a bucket-head array (one bucket per slot, so
    load <= 1), a per-slot link, and a per-slot byte of the key's hash checked before
    the key, so nearly every foreign record on a chain is skipped without touching its
    key. (The tag byte was a variant here first, "chain-tag": misses 0.77x of the
    untagged chain, hits unchanged, for 1 byte per record; it was adopted.)
fatp
    NetBSD's fat pointer, faithfully: 64-byte rows (one cache line) of one word
    ``inuse`` (15 bits) | ``nxt`` row (17 bits) and 15 32-bit tags
    ``hash32 ^ (idx << 16 | idx)``, hung off ``--fat-load``-records-per-anchor chains.
    A lookup decodes each used tag of each row of its chain and compares a record's key
    only when the two index copies agree (a foreign tag passes with probability
    2^-16). A full head gets a new row pushed in front (NetBSD's "tape worm"), rows fill
    highest slot first, an emptied row is freed, and each record keeps
    ``row << 4 | slot`` (NetBSD's ``vtw->key``) so deletion needs no search. The decode
    runs once per tag in Python bytecode.
fatp16
    The same rows holding the same bits, laid out for CPython: tag ``t`` is stored as
    ``(t_hi ^ t_lo, t_lo)``. NetBSD's test ``t_hi ^ h_hi == t_lo ^ h_lo`` is
    ``t_hi ^ t_lo == h_hi ^ h_lo``: a 16-bit fingerprint of the hash, so one
    ``bytearray.find`` scans a row's 15 fingerprints in C and the index is
    ``t_lo ^ h_lo``. Same cache line, same 2^-16 false candidates.
chain-x2
    ``chain`` with twice as many bucket heads (load <= 0.5): half the foreign records
    per chain (2 bytes per record).

Per design: lookup ns for hits (keys of live records, in random order) and misses
(random keys never inserted: every new SYN looks up the pools and misses); key
comparisons ("probes", counted in ``stats.connect`` exactly as ``Pool`` does) per hit
and per miss; losing (comparisons that were not the record sought) per lookup, hits
and misses weighted equally; Python-level steps per lookup (links followed, tags decoded
or ``find`` calls, counted in an untimed pass); max chain (records on one bucket or
anchor chain, at insert) and max probes per lookup; insert+delete ns (``free_record``
of the oldest record then ``insert`` of a new one, whole records); and bytes per
record of the full-key hash structures alone (preallocated, over the pool's capacity;
the port hash is the same in every design and not counted).

Lookups get fresh key objects on every pass so ``hash(key)`` is computed, as for a
packet's key (bytes cache their hash). Timed loops include the ``for`` and the call
and run with the collector off. Designs are measured interleaved, in a rotating order,
``--rounds`` times; the table shows medians.
"""

from __future__ import annotations

import argparse
import gc
import math
import random
import statistics
import struct
import time
from array import array

from statetable.events import RemoveReason
from statetable.state import State
from statetable.vtw import HashStats, Pool, VtwStats

AF = 4
CLS = 1  # any MSLT class: the class does not change a pool's code
BASE = 0  # the pools' tick base: expiries are stored relative to it
EXPIRE = 1000.0  # every record's expiry (nothing expires during the bench)
M32 = 0xFFFFFFFF
NTAGS = 15  # tags per fat pointer: (1 + 15) x 4 bytes = a 64-byte line
FULL = (1 << NTAGS) - 1  # the inuse bits of a full row
ROW_WORDS = NTAGS + 1
ROW_BYTES = 4 * ROW_WORDS
# fatp16 rows in bytes: [0:4] the inuse|nxt word, [4:34] 15 fingerprints, [34:64] 15
# masked indices (as 16-bit halves: [2:17] and [17:32]).
FP_OFF = 4
FP_END = FP_OFF + 2 * NTAGS
# A fingerprint as the 2-byte pattern ``find`` wants (native order, as memoryview "H").
# A table of all 65536 patterns would save ~30 ns a lookup but holds ~2.4 MB.
PACK_H = struct.Struct("=H").pack


def _no_remove(pool: Pool, slot: int, reason: RemoveReason) -> None:
    """``on_remove`` for the bench: nothing to tell."""


# ---- Pool's port hash, for subclasses that take over ``_link``/``_unlink`` -------------
# The prototypes change only the full-key hash; the port hash runs Pool's own code.


def link_port(pool: Pool, slot: int, key: bytes) -> None:
    """Chain ``slot`` into the port hash, as Pool._link does."""
    bucket = pool._port_bucket(key)
    pool.port_next[slot] = pool.port_heads[bucket]
    pool.port_heads[bucket] = slot


def unlink_port(pool: Pool, slot: int, key: bytes) -> None:
    """Take ``slot`` out of the port hash, as Pool._unlink does."""
    pool._unchain(pool.port_heads, pool.port_next, pool._port_bucket(key), slot)


# ---- chained variants ---------------------------------------------------------------


class WideChainPool(Pool):
    """Pool's chained full-key hash with ``factor`` bucket heads per slot."""

    factor = 1

    def __init__(self, entries: int, stats: VtwStats) -> None:
        super().__init__(AF, CLS, entries, stats, BASE, slots=entries)
        buckets = entries * self.factor
        self.key_mask = buckets - 1  # Pool's _link, _unlink and lookup use it
        self.key_heads = array(self.key_heads.typecode, bytes(self.key_heads.itemsize * buckets))


class ChainX2Pool(WideChainPool):
    """Twice the bucket heads: load <= 0.5."""

    factor = 2


# ---- fat pointers ---------------------------------------------------------------------


class _FatPool(Pool):
    """A Pool whose full-key hash is a fat-pointer hash: rows, anchors, tape worm.
    Subclasses store and search the tags."""

    def __init__(self, entries: int, stats: VtwStats, per_anchor: float) -> None:
        super().__init__(AF, CLS, entries, stats, BASE, slots=entries)
        if entries > 0x10000:
            raise ValueError("the fat-pointer prototypes take narrow (16-bit) indices only")
        capacity = entries - 1
        self.key_heads = array("H")  # Pool's chained full-key hash is not used
        self.key_next = array("H")
        self.nanchors = max(1, round(capacity / per_anchor))
        # NetBSD's sizing: 2 x anchors + 10 % more than the records' tags need; row 0 is
        # nil. (Each chain has a partly filled head, and the tape worm keeps older rows
        # until their last record leaves.)
        self.nrows = 1 + 2 * self.nanchors + (11 * capacity // NTAGS) // 10
        if self.nrows >= 1 << 17:
            raise ValueError("too many fat pointers for a 17-bit nxt field")
        self.rows = bytearray(ROW_BYTES * self.nrows)
        self.words = memoryview(self.rows).cast("I")  # 16 words a row
        self.halves = memoryview(self.rows).cast("H")  # 32 halves a row
        anchor_type = "H" if self.nrows <= 0x10000 else "I"
        self.anchors = array(anchor_type, bytes(array(anchor_type).itemsize * self.nanchors))
        # Per slot: row << 4 | tag slot of its record (NetBSD's vtw->key), 0 when free.
        self.fkey = array("I", bytes(4 * entries))
        self.free_row = 0  # threaded through nxt
        for r in range(self.nrows - 1, 0, -1):
            self.words[r * ROW_WORDS] = self.free_row << NTAGS
            self.free_row = r
        self.rows_used = self.rows_peak = 0

    def _set_tag(self, r: int, i: int, h32: int, slot: int) -> None:
        raise NotImplementedError

    def _clear_tag(self, r: int, i: int) -> None:
        raise NotImplementedError

    def scan_steps(self, key: bytes) -> int:
        """Python-level steps a lookup of ``key`` takes (untimed, for the table)."""
        raise NotImplementedError

    @property
    def hash_nbytes(self) -> int:
        """Bytes of the full-key hash: rows, anchors and per-record fat keys."""
        return (
            len(self.rows)
            + self.anchors.itemsize * len(self.anchors)
            + self.fkey.itemsize * len(self.fkey)
        )

    def _alloc_row(self) -> int:
        r = self.free_row
        if not r:
            # NetBSD would age records out here; the bench's sizing must avoid it.
            raise RuntimeError("fat pointers exhausted: raise the row sizing")
        self.free_row = self.words[r * ROW_WORDS] >> NTAGS
        self.words[r * ROW_WORDS] = 0
        self.rows_used += 1
        self.rows_peak = max(self.rows_peak, self.rows_used)
        return r

    def _free_row(self, r: int) -> None:
        self.words[r * ROW_WORDS] = self.free_row << NTAGS
        self.free_row = r
        self.rows_used -= 1

    def _link(self, slot: int, key: bytes) -> None:
        link_port(self, slot, key)
        h = hash(key)
        a = h % self.nanchors
        words = self.words
        r = self.anchors[a]
        if not r or words[r * ROW_WORDS] & FULL == FULL:
            # No row, or the head is full: push a new row in front. Rows further down
            # hold older records, which leave first (NetBSD's tape worm).
            new = self._alloc_row()
            words[new * ROW_WORDS] = r << NTAGS
            self.anchors[a] = r = new
        base = r * ROW_WORDS
        word = words[base]
        i = (~word & FULL).bit_length() - 1  # highest free slot, as NetBSD
        words[base] = word | 1 << i
        self._set_tag(r, i, h >> 32 & M32, slot)
        self.fkey[slot] = r << 4 | i
        chain = 0  # records, as Pool counts
        while r:
            word = words[r * ROW_WORDS]
            chain += (word & FULL).bit_count()
            r = word >> NTAGS
        if chain > self.stats.connect.max_chain:
            self.stats.connect.max_chain = chain

    def _unlink(self, slot: int) -> None:
        key = self._key_at(slot)
        unlink_port(self, slot, key)
        k = self.fkey[slot]
        r, i = k >> 4, k & 15
        words = self.words
        base = r * ROW_WORDS
        word = words[base] & ~(1 << i)
        words[base] = word
        self._clear_tag(r, i)
        self.fkey[slot] = 0
        if word & FULL:
            return
        # The row is empty (its word is now nxt << 15): unlink and free it, unless it
        # is its chain's only row, kept for the next insert as NetBSD does.
        a = hash(key) % self.nanchors
        q = self.anchors[a]
        if q == r:
            if word:
                self.anchors[a] = word >> NTAGS
                self._free_row(r)
            return
        while (w := words[q * ROW_WORDS]) >> NTAGS != r:
            q = w >> NTAGS
        words[q * ROW_WORDS] = (w & FULL) | word
        self._free_row(r)


class FatPool(_FatPool):
    """NetBSD's fat pointer: 32-bit tags decoded one by one in Python."""

    def _set_tag(self, r: int, i: int, h32: int, slot: int) -> None:
        self.words[r * ROW_WORDS + 1 + i] = h32 ^ (slot << 16 | slot)

    def _clear_tag(self, r: int, i: int) -> None:
        self.words[r * ROW_WORDS + 1 + i] = 0

    def lookup(self, key: bytes) -> int:
        """The slot of the live record with this key, or 0 (counted in lookup_connect)."""
        h = hash(key)
        h32 = h >> 32 & M32
        words = self.words
        r = self.anchors[h % self.nanchors]
        kl = self.keylen
        buf = self.keys
        fkey = self.fkey
        probes = 0
        while r:
            base = r * ROW_WORDS
            word = words[base]
            inuse = word & FULL
            # Only the span from the lowest to the highest used slot (NetBSD skips
            # unused slots bit by bit; slice bounds do most of it in C). An empty row
            # gives an empty span.
            for t in words[base + (inuse & -inuse).bit_length() : base + 1 + inuse.bit_length()]:
                d = t ^ h32
                if d >> 16 == d & 0xFFFF:  # both index copies agree
                    probes += 1
                    o = (d & 0xFFFF) * kl
                    # A cleared (zero) tag inside the span may decode by chance to a
                    # free slot whose old key bytes remain; a free slot's fat key is 0.
                    if buf[o : o + kl] == key and fkey[d & 0xFFFF]:
                        self.stats.connect.record(True, probes, probes - 1)
                        return d & 0xFFFF
            r = word >> NTAGS
        self.stats.connect.record(False, probes, probes)
        return 0

    def scan_steps(self, key: bytes) -> int:
        """Tags decoded by a lookup of ``key``."""
        target = self.lookup(key)
        h = hash(key)
        h32 = h >> 32 & M32
        steps = 0
        r = self.anchors[h % self.nanchors]
        while r:
            base = r * ROW_WORDS
            word = self.words[base]
            inuse = word & FULL
            for t in self.words[
                base + (inuse & -inuse).bit_length() : base + 1 + inuse.bit_length()
            ]:
                steps += 1
                d = t ^ h32
                if target and d >> 16 == d & 0xFFFF and d & 0xFFFF == target:
                    return steps
            r = word >> NTAGS
        return steps


class Fat16Pool(_FatPool):
    """The fat pointer with each tag kept as (fingerprint, masked index) halves, so one
    ``bytearray.find`` scans a row."""

    def _set_tag(self, r: int, i: int, h32: int, slot: int) -> None:
        lo = h32 & 0xFFFF
        half = r * 2 * ROW_WORDS + 2 + i
        self.halves[half] = (h32 >> 16) ^ lo  # t_hi ^ t_lo
        self.halves[half + NTAGS] = slot ^ lo  # t_lo

    def _clear_tag(self, r: int, i: int) -> None:
        half = r * 2 * ROW_WORDS + 2 + i
        self.halves[half] = self.halves[half + NTAGS] = 0

    def lookup(self, key: bytes) -> int:
        """The slot of the live record with this key, or 0 (counted in lookup_connect)."""
        h = hash(key)
        h32 = h >> 32 & M32
        lo = h32 & 0xFFFF
        pattern = PACK_H((h32 >> 16) ^ lo)
        rows = self.rows
        words = self.words
        r = self.anchors[h % self.nanchors]
        probes = 0
        while r:
            b = r * ROW_BYTES
            end = b + FP_END
            j = rows.find(pattern, b + FP_OFF, end)
            while j >= 0:
                # Aligned (not straddling two fingerprints) on a used slot: NetBSD's
                # plausible tag, so compare the record. (Attributes are read here, not
                # before the loop, to keep them off the miss path.)
                if not j & 1 and words[r * ROW_WORDS] >> ((j - b - FP_OFF) >> 1) & 1:
                    probes += 1
                    slot = self.halves[(j >> 1) + NTAGS] ^ lo
                    o = slot * self.keylen
                    if self.keys[o : o + self.keylen] == key:
                        self.stats.connect.record(True, probes, probes - 1)
                        return slot
                j = rows.find(pattern, j + 1, end)
            r = words[r * ROW_WORDS] >> NTAGS
        self.stats.connect.record(False, probes, probes)
        return 0

    def scan_steps(self, key: bytes) -> int:
        """``find`` calls made by a lookup of ``key``."""
        target = self.lookup(key)
        h = hash(key)
        h32 = h >> 32 & M32
        lo = h32 & 0xFFFF
        pattern = PACK_H((h32 >> 16) ^ lo)
        steps = 0
        r = self.anchors[h % self.nanchors]
        while r:
            b = r * ROW_BYTES
            steps += 1
            j = self.rows.find(pattern, b + FP_OFF, b + FP_END)
            while j >= 0:
                if target and not j & 1 and self.halves[(j >> 1) + NTAGS] ^ lo == target:
                    return steps
                steps += 1
                j = self.rows.find(pattern, j + 1, b + FP_END)
            r = self.words[r * ROW_WORDS] >> NTAGS
        return steps


# ---- the bench ----------------------------------------------------------------------

DESIGNS = ("chain", "fatp", "fatp16", "chain-x2")


def make_pool(name: str, entries: int, fat_load: float) -> Pool:
    """A fresh pool of the named design."""
    stats = VtwStats()
    if name == "chain":
        return Pool(AF, CLS, entries, stats, BASE, slots=entries)
    if name == "fatp":
        return FatPool(entries, stats, fat_load)
    if name == "fatp16":
        return Fat16Pool(entries, stats, fat_load)
    if name == "chain-x2":
        return ChainX2Pool(entries, stats)
    raise ValueError(name)


def hash_nbytes(pool: Pool) -> int:
    """Bytes of a pool's full-key hash structures (chains: heads, links and tags)."""
    if isinstance(pool, _FatPool):
        return pool.hash_nbytes
    return sum(a.itemsize * len(a) for a in (pool.key_heads, pool.key_next)) + len(pool.tags)


def scan_steps(pool: Pool, key: bytes) -> int:
    """Python-level steps of a lookup (chains: links followed)."""
    if isinstance(pool, _FatPool):
        return pool.scan_steps(key)
    i = pool.key_heads[hash(key) & pool.key_mask]
    steps = 0
    while i:
        steps += 1
        o = i * pool.keylen
        if pool.keys[o : o + pool.keylen] == key:
            break
        i = pool.key_next[i]
    return steps


class Design:
    """One pool under test: its churn position and its samples."""

    def __init__(self, name: str, pool: Pool) -> None:
        self.name = name
        self.pool = pool
        self.cursor = 0  # index of the next state to insert
        self.samples: dict[str, list[float]] = {}
        self.max_probe = 0

    def record(self, what: str, value: float) -> None:
        self.samples.setdefault(what, []).append(value)

    def median(self, what: str) -> float:
        return statistics.median(self.samples[what])


def random_keys(rng: random.Random, n: int) -> list[bytes]:
    """``n`` distinct random IPv4 keys (addresses and ports all random)."""
    seen: set[bytes] = set()
    while len(seen) < n:
        seen.add(rng.getrandbits(96).to_bytes(12, "big"))
    keys = sorted(seen)
    rng.shuffle(keys)
    return keys


def fresh(keys: list[bytes]) -> list[bytes]:
    """New bytes objects equal to ``keys``: their hash is not cached yet."""
    return [bytes(bytearray(k)) for k in keys]


def take_stats(d: Design) -> HashStats:
    """Swap in fresh lookup counters (keeping max_chain) and return the old ones."""
    old = d.pool.stats.connect
    d.pool.stats.connect = HashStats()
    d.pool.stats.connect.max_chain = old.max_chain
    return old


def time_lookups(d: Design, keys: list[bytes], seconds: float) -> tuple[float, HashStats]:
    """(ns per lookup, the counters of those lookups): passes over ``keys`` until
    ``seconds`` of lookup time."""
    lookup = d.pool.lookup
    take_stats(d)
    elapsed = 0.0
    n = 0
    while elapsed < seconds:
        batch = fresh(keys)
        gc.disable()
        t0 = time.perf_counter()
        for k in batch:
            lookup(k)
        elapsed += time.perf_counter() - t0
        gc.enable()
        n += len(batch)
    stats = take_stats(d)
    d.max_probe = max(d.max_probe, stats.max_probe)
    return elapsed / n * 1e9, stats


def time_churn(d: Design, states: list[State], seconds: float) -> float:
    """ns per (free the oldest record + insert a new one). ``states`` is cycled: it is
    longer than the live count, so a live key is never inserted again."""
    pool = d.pool
    insert = pool.insert
    free = pool.free_record
    elapsed = 0.0
    n = 0
    while elapsed < seconds:
        batch = [states[(d.cursor + j) % len(states)] for j in range(2000)]
        d.cursor += len(batch)
        gc.disable()
        t0 = time.perf_counter()
        for st in batch:
            free(pool.oldest)
            insert(st, EXPIRE, -math.inf, _no_remove)
        elapsed += time.perf_counter() - t0
        gc.enable()
        n += len(batch)
    return elapsed / n * 1e9


def check(d: Design, misses: list[bytes], sample: int = 2000) -> None:
    """Live records are found at their slots; absent keys are not found."""
    pool = d.pool
    slots = list(pool.slots())
    assert pool.live == len(slots), d.name
    for slot in slots[: sample // 2] + slots[-sample // 2 :]:
        got = pool.lookup(pool.key(slot))
        assert got == slot, (d.name, slot, got)
    for k in misses[:sample]:
        assert pool.lookup(k) == 0, d.name


def verdict(designs: list[Design]) -> str:
    """One line: the chain against the best fat pointer, and the fastest design."""
    by_name = {d.name: d for d in designs}

    def vs(a: Design, b: Design) -> str:
        return (
            f"misses {a.median('miss_ns') / b.median('miss_ns'):.2f}x, "
            f"hits {a.median('hit_ns') / b.median('hit_ns'):.2f}x, "
            f"ins+del {a.median('churn_ns') / b.median('churn_ns'):.2f}x, "
            f"bytes {hash_nbytes(a.pool) / hash_nbytes(b.pool):.2f}x"
        )

    parts = []
    chain = by_name.get("chain")
    fats = [d for d in designs if d.name.startswith("fatp")]
    if chain and fats:
        fat = min(fats, key=lambda d: d.median("miss_ns"))
        better = "fat pointer" if fat.median("miss_ns") < chain.median("miss_ns") else "chain"
        parts.append(f"keep the {better}: best fat pointer ({fat.name}) vs chain: {vs(fat, chain)}")
    best = min(designs, key=lambda d: d.median("miss_ns"))
    if chain and best is not chain:
        parts.append(f"fastest misses: {best.name} vs chain: {vs(best, chain)}")
    elif not parts:
        parts.append(f"fastest misses: {best.name}")
    return "verdict: " + "; ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--entries",
        type=int,
        default=65536,
        help="slots per pool, a power of two in 4..65536 (default 65536)",
    )
    ap.add_argument(
        "--load",
        type=float,
        default=1.0,
        help="fraction of the capacity (entries - 1) filled (default 1.0)",
    )
    ap.add_argument(
        "--seconds",
        type=float,
        default=0.4,
        help="lookup or churn time per measurement (default 0.4)",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="interleaved repetitions; the table shows medians (default 5)",
    )
    ap.add_argument(
        "--fat-load",
        type=float,
        default=8.0,
        help="records per fat-pointer anchor (default 8; NetBSD's 512 "
        "anchors for 65536 entries is 128)",
    )
    ap.add_argument(
        "--designs",
        default=",".join(DESIGNS),
        help=f"comma-separated subset of {', '.join(DESIGNS)} (default all)",
    )
    ap.add_argument("--seed", type=int, default=1, help="key generator seed (default 1)")
    args = ap.parse_args()
    if args.entries & (args.entries - 1) or not 4 <= args.entries <= 0x10000:
        ap.error("--entries must be a power of two in 4..65536")
    if not 0 < args.load <= 1:
        ap.error("--load must be in (0, 1]")
    names = args.designs.split(",")
    if not names or set(names) - set(DESIGNS):
        ap.error(f"--designs: choose from {', '.join(DESIGNS)}")

    rng = random.Random(args.seed)
    capacity = args.entries - 1
    live = max(1, round(args.load * capacity))
    # 2 x capacity states to insert, cycled by the churn; misses are never inserted.
    keys = random_keys(rng, 3 * capacity)
    states = [State(k, 6, n + 1, 0x1234, 0.0) for n, k in enumerate(keys[: 2 * capacity])]
    misses = keys[2 * capacity :]

    designs = [Design(name, make_pool(name, args.entries, args.fat_load)) for name in names]
    for d in designs:
        assert d.pool.fits(EXPIRE)
        for st in states[:live]:
            d.pool.insert(st, EXPIRE, -math.inf, _no_remove)
        d.cursor = live
        check(d, misses)
    gc.collect()
    gc.freeze()  # states and keys live to the end: keep them out of GC passes

    fat = next((d.pool for d in designs if isinstance(d.pool, _FatPool)), None)
    layout = f", fat pointers: {fat.nanchors} anchors, {fat.nrows - 1} rows" if fat else ""
    print(
        f"IPv4 keys, {args.entries} slots, {live} records (load {args.load:g}){layout}; "
        f"{args.rounds} rounds x {args.seconds:g} s per measurement"
    )
    for rnd in range(args.rounds):
        for d in designs[rnd % len(designs) :] + designs[: rnd % len(designs)]:
            hits = [d.pool.key(s) for s in d.pool.slots()]
            rng.shuffle(hits)
            ns, st = time_lookups(d, hits, args.seconds)
            assert st.hit == st.look, (d.name, "a hit was missed")
            d.record("hit_ns", ns)
            d.record("probe_hit", st.probe / st.look)
            d.record("loss_hit", st.losing / st.look)
            ns, st = time_lookups(d, misses, args.seconds)
            assert st.miss == st.look, (d.name, "a miss was hit")
            d.record("miss_ns", ns)
            d.record("probe_miss", st.probe / st.look)
            d.record("loss_miss", st.losing / st.look)
            d.record("churn_ns", time_churn(d, states, args.seconds))
    for d in designs:
        check(d, misses)
        # A random sample: by age it would be biased (new records sit at chain heads).
        slots = list(d.pool.slots())
        hits = [d.pool.key(s) for s in rng.sample(slots, min(20000, len(slots)))]
        d.record("steps_hit", statistics.fmean(scan_steps(d.pool, k) for k in hits))
        d.record("steps_miss", statistics.fmean(scan_steps(d.pool, k) for k in misses[:20000]))

    header = (
        f"{'design':9} {'hit ns':>6} {'miss ns':>7} {'cmp/hit':>7} {'cmp/miss':>8} "
        f"{'lose/lk':>7} {'steps h/m':>10} {'max chain':>9} {'max probe':>9} "
        f"{'ins+del ns':>10} {'hash B/rec':>10}"
    )
    print(header)
    print("-" * len(header))
    for d in designs:
        lose = (d.median("loss_hit") + d.median("loss_miss")) / 2
        steps = f"{d.median('steps_hit'):.2f}/{d.median('steps_miss'):.2f}"
        print(
            f"{d.name:9} {d.median('hit_ns'):6.0f} {d.median('miss_ns'):7.0f} "
            f"{d.median('probe_hit'):7.3f} {d.median('probe_miss'):8.4f} {lose:7.4f} "
            f"{steps:>10} {d.pool.stats.connect.max_chain:9d} {d.max_probe:9d} "
            f"{d.median('churn_ns'):10.0f} {hash_nbytes(d.pool) / capacity:10.2f}"
        )
    for d in designs:
        if isinstance(d.pool, _FatPool):
            # What the rows would cost if sized to the peak seen (a lower bound).
            tight = hash_nbytes(d.pool) - ROW_BYTES * (d.pool.nrows - 1 - d.pool.rows_peak)
            print(
                f"{d.name}: rows in use {d.pool.rows_used}, peak {d.pool.rows_peak} of "
                f"{d.pool.nrows - 1} allocated ({ROW_BYTES} B each); sized to the peak "
                f"the hash would take {tight / capacity:.2f} B/rec"
            )
    print(
        "range over rounds, hit / miss ns: "
        + "; ".join(
            f"{d.name} {min(d.samples['hit_ns']):.0f}-{max(d.samples['hit_ns']):.0f} / "
            f"{min(d.samples['miss_ns']):.0f}-{max(d.samples['miss_ns']):.0f}"
            for d in designs
        )
    )
    print(
        "lose/lk: losing per lookup (hits and misses weighted equally); steps per "
        "hit/miss: links followed (chain*), tags decoded (fatp), find calls (fatp16)"
    )
    print(verdict(designs))


if __name__ == "__main__":
    main()
