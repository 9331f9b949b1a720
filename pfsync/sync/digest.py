"""The table digest: an order-independent summary two peers compare to find drift.

``digest = sum(h(state)) mod 2**64`` over every state and TIME_WAIT record that is
replicated (NOSYNC states are not), where ``h`` is a 64-bit BLAKE2b of the state's
identity, key, protocol and both peer states. A sum can be kept up to date with one
addition per change (insert: +h, removal: -h, peer-state transition: -h(old) + h(new)),
so nobody scans the table to compare two of them. Windows, counters and expiry are left
out on purpose: they move with every packet and both nodes see different packets.
"""

from __future__ import annotations

import struct
from hashlib import blake2b

_MASK = (1 << 64) - 1
_FIELDS = struct.Struct("!QIBBB")


def state_hash(id: int, creatorid: int, key: bytes, proto: int, src: int, dst: int) -> int:
    """The 64-bit hash one state contributes to the digest."""
    data = _FIELDS.pack(id, creatorid, proto, src, dst) + key
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "big")


class Digest:
    """A running digest: add and remove states' hashes."""

    __slots__ = ("value", "states")

    def __init__(self) -> None:
        self.value = 0
        self.states = 0

    def add(self, h: int) -> None:
        """A state joined the table."""
        self.value = (self.value + h) & _MASK
        self.states += 1

    def remove(self, h: int) -> None:
        """A state left the table."""
        self.value = (self.value - h) & _MASK
        self.states -= 1

    def replace(self, old: int, new: int) -> None:
        """A state's hashed fields changed."""
        self.value = (self.value - old + new) & _MASK
