"""One tracked connection: :class:`State` and its two :class:`Peer` halves.

Memory matters here (a table holds up to millions of these), so:
- both classes use ``__slots__``;
- a State *is* its source peer (it subclasses Peer); ``state.src`` returns the state
  itself. That saves one object (32 bytes of header and GC link) per state;
- a peer's packet and byte counters share one int, ``traffic = packets << 48 | bytes``,
  so counting a packet is one addition and costs one int object instead of two;
- window sizes are interned (``U16``) because most connections share a few values.
Addresses and ports live only in the key (see :mod:`statetable.keys`).
"""

from __future__ import annotations

from statetable import keys

# One packet in ``Peer.traffic``: packets count from bit 48, bytes below it.
PACKET = 1 << 48
BYTES_MASK = PACKET - 1
# Shared int objects for 16-bit values (max_win): one copy instead of one per state.
U16: tuple[int, ...] = tuple(range(65536))

# TCP peer states (pf's TCPS_*, compared with < and >=).
(
    CLOSED,
    LISTEN,
    SYN_SENT,
    SYN_RCVD,
    ESTABLISHED,
    CLOSE_WAIT,
    FIN_WAIT_1,
    CLOSING,
    LAST_ACK,
    FIN_WAIT_2,
    TIME_WAIT,
) = range(11)
# UDP and "other" peer states (pf's PFUDPS_* / PFOTHERS_*).
NO_TRAFFIC, SINGLE, MULTIPLE = range(3)

# pf encodes "the SYN carried a window-scale option" as a flag beside the shift.
WSCALE_FLAG = 0x80
WSCALE_MASK = 0x0F

# State.flags bits.
FLAG_NOSYNC = 0x01  # never replicated (pf's PFSTATE_NOSYNC)
FLAG_OUT = 0x02  # created by an outbound packet (pf direction PF_OUT)

IN, OUT = 1, 2


class Peer:
    """One side of a connection as pf tracks it (struct pf_state_peer)."""

    __slots__ = ("state", "seqlo", "seqhi", "max_win", "wscale", "traffic")

    def __init__(self) -> None:
        self.state = 0
        self.seqlo = 0
        self.seqhi = 0
        self.max_win = 0
        self.wscale = 0
        self.traffic = 0

    @property
    def packets(self) -> int:
        """Packets sent by this side."""
        return self.traffic >> 48

    @property
    def bytes(self) -> int:
        """Bytes (IP total length) sent by this side."""
        return self.traffic & BYTES_MASK


class State(Peer):
    """A connection's state. Its own Peer fields are the source (initiator) side."""

    __slots__ = ("key", "proto", "id", "creatorid", "dst", "timeout", "creation", "expire", "flags")

    def __init__(self, key: bytes, proto: int, id: int, creatorid: int, now: float) -> None:
        super().__init__()
        self.key = key
        self.proto = proto
        self.id = id
        self.creatorid = creatorid
        self.dst = Peer()
        self.timeout = 0
        self.creation = now
        self.expire = now
        self.flags = 0

    @property
    def src(self) -> Peer:
        """The side that sent the first packet (the state itself, see module doc)."""
        return self

    @property
    def direction(self) -> int:
        """pf direction of the creating packet: IN (1) or OUT (2)."""
        return OUT if self.flags & FLAG_OUT else IN

    @property
    def af(self) -> int:
        """4 or 6."""
        return keys.family(self.key)

    def endpoints(self) -> tuple[bytes, int, bytes, int]:
        """(src address, src port, dst address, dst port) as the first packet had them."""
        return keys.unpack(self.key)

    def __repr__(self) -> str:
        sa, sp, da, dp = self.endpoints()
        return (
            f"State(id={self.id:#x}, creatorid={self.creatorid:#010x}, proto={self.proto}, "
            f"{keys.format_endpoint(sa, sp)} -> {keys.format_endpoint(da, dp)}, "
            f"peers={self.state}:{self.dst.state})"
        )
