"""MSL Truncation (NetBSD's MSLT): how long a TCP connection stays in TIME_WAIT.

TIME_WAIT must outlast any segment of the old connection still in the network: two
maximum segment lifetimes (2 x MSL). A segment cannot wander long between two ends on
the same host or the same link, so the MSL depends on how near the two ends are:

    class     ends                                   MSL (sysctl net.inet.tcp.mslt.*)
    loopback  equal addresses, 127.0.0.0/8 or ::1    .loopback  1 s  -> TIME_WAIT 2 s
    local     both inside the node's local networks  .local     5 s  -> 10 s
    remote    anything else                          .remote   30 s  -> 60 s

A firewall sees both ends, so "local" means *both* addresses are on a local network
(the host's own addresses are, so a node watching its own traffic classifies as a host
would). IPv6 link-local addresses are on-link by definition and count as local.
With MSLT off every connection is classless (NetBSD's class 0) and uses the remote MSL.

A state's class is computed once, when it becomes ESTABLISHED (addresses never change),
and kept in three bits of ``State.flags`` (class + 1, so 0 means "not yet").
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from pydantic import BaseModel, Field

# NetBSD's class numbers: 0 classless (MSLT off), 1 remote, 2 local, 3 loopback.
CLASSLESS, REMOTE, LOCAL, LOOPBACK = range(4)
CLASS_NAMES: tuple[str, ...] = ("classless", "remote", "local", "loopback")
# State.flags keeps class + 1 (0 = not classified yet) in these bits.
FLAG_SHIFT = 2
FLAG_MASK = 0x7 << FLAG_SHIFT

_V6_LOOPBACK_BYTES = bytes(15) + b"\x01"
_V6_LINK_LOCAL = (0xFE80 << 112, ((1 << 10) - 1) << 118)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


# Largest MSL a class may be given, in seconds.
MSL_MAX = 3600


class MsltConfig(BaseModel):
    """The net.inet.tcp.mslt.* knobs (MSLs in seconds)."""

    enable: bool = True
    loopback: int = Field(1, ge=0, le=MSL_MAX)
    local: int = Field(5, ge=0, le=MSL_MAX)
    remote: int = Field(30, ge=0, le=MSL_MAX)


class Mslt:
    """Classifies connections and gives their TIME_WAIT lifetime."""

    def __init__(
        self, config: MsltConfig | None = None, local_nets: Iterable[Network] = ()
    ) -> None:
        self.config = config or MsltConfig()
        self.set_local_nets(local_nets)

    def set_local_nets(self, nets: Iterable[Network]) -> None:
        """Replace the local networks (states already classified keep their class)."""
        self.local_nets = list(nets)
        # (network, mask) as ints: a membership test is one AND and one compare.
        self._v4 = [
            (int(n.network_address), int(n.netmask)) for n in self.local_nets if n.version == 4
        ]
        self._v6 = [
            (int(n.network_address), int(n.netmask)) for n in self.local_nets if n.version == 6
        ]
        self._v6.append(_V6_LINK_LOCAL)

    def classify(self, key: bytes) -> int:
        """LOOPBACK, LOCAL or REMOTE for a state key (see :mod:`statetable.keys`)."""
        n = (len(key) - 4) >> 1
        src, dst = key[:n], key[n : n + n]
        if src == dst:
            return LOOPBACK
        if n == 4:
            if key[0] == 127 or key[4] == 127:  # 127.0.0.0/8, without int maths
                return LOOPBACK
            nets = self._v4
            if not nets:
                return REMOTE
        else:
            if src == _V6_LOOPBACK_BYTES or dst == _V6_LOOPBACK_BYTES:
                return LOOPBACK
            nets = self._v6
        a = int.from_bytes(src, "big")
        b = int.from_bytes(dst, "big")
        if any(a & m == k for k, m in nets) and any(b & m == k for k, m in nets):
            return LOCAL
        return REMOTE

    def state_class(self, key: bytes, flags: int) -> int:
        """The class a state enters TIME_WAIT with: classless when MSLT is off."""
        if not self.config.enable:
            return CLASSLESS
        stored = (flags & FLAG_MASK) >> FLAG_SHIFT
        return stored - 1 if stored else self.classify(key)

    def msl(self, cls: int) -> int:
        """The MSL of a class in seconds (classless uses the remote MSL)."""
        c = self.config
        return c.loopback if cls == LOOPBACK else c.local if cls == LOCAL else c.remote

    def time_wait(self, cls: int) -> float:
        """How long TIME_WAIT lasts for a class: 2 x MSL."""
        return 2.0 * self.msl(cls)


def class_flags(cls: int) -> int:
    """State.flags bits recording a class."""
    return (cls + 1) << FLAG_SHIFT


def stored_class(flags: int) -> int:
    """The class recorded in State.flags (a TIME_WAIT state always has one)."""
    return ((flags & FLAG_MASK) >> FLAG_SHIFT) - 1
