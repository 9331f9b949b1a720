"""Live capture on Linux: an AF_PACKET raw socket bound to one interface.

The socket is made with protocol 0 (it receives nothing) and only starts receiving when it is
bound to the interface with ETH_P_ALL, so no frame from another interface slips in between.
On a loopback device the kernel hands every frame to packet sockets twice, once as it leaves
(PACKET_OUTGOING) and once as it arrives (PACKET_HOST); the outgoing copy is dropped there, as
libpcap does. On other devices the outgoing frames are real traffic and are kept.
"""

from __future__ import annotations

import errno
import socket
import struct
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from statetable.decode import LINKTYPE_ETHERNET, LINKTYPE_RAW

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_STATISTICS = 6
PACKET_OUTGOING = 4
SO_RCVBUFFORCE = 33
SO_TIMESTAMPNS = 35  # SO_TIMESTAMPNS_OLD: a native struct timespec, what Python 3.11 can parse

ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772  # lo frames carry an all-zero Ethernet header
ARPHRD_NONE = 65534  # tun, wireguard: bare IP packets

_LINKTYPES = {
    ARPHRD_ETHER: LINKTYPE_ETHERNET,
    ARPHRD_LOOPBACK: LINKTYPE_ETHERNET,
    ARPHRD_NONE: LINKTYPE_RAW,
}
_TIMESPEC = struct.Struct("@qq")
_TPACKET_STATS = struct.Struct("@II")  # tp_packets (includes drops), tp_drops
_MAX_FRAME = 262144  # above the largest GSO frame, so frames are never cut
# A Python reader is slower than lo in bursts; the kernel buffers the difference.
_RCVBUF = 64 * 1024 * 1024


class InterfaceError(OSError):
    """The interface cannot be captured on (missing, or of an unsupported link type).

    Made as ``InterfaceError(errno, message)``; it prints as the message alone, one line.
    """

    def __str__(self) -> str:
        return str(self.strerror)


@dataclass(frozen=True)
class CaptureStats:
    """Counters of one capture: frames handed out, frames the kernel dropped for lack of buffer."""

    received: int
    dropped: int


class PacketCapture:
    """Frames of one interface, read without blocking: `recv()` returns None when none is waiting.

    Wait for readiness with `select`/`selectors` or an event loop's `add_reader` on `fileno()`.
    """

    def __init__(self, sock: socket.socket, ifname: str, hatype: int) -> None:
        self._sock = sock
        self.ifname = ifname
        self.linktype = _LINKTYPES[hatype]
        self._skip_outgoing = hatype == ARPHRD_LOOPBACK
        self._buf = bytearray(_MAX_FRAME)
        self._view = memoryview(self._buf)
        self._ancbufsize = socket.CMSG_SPACE(_TIMESPEC.size)
        self._received = 0
        self._dropped = 0

    @classmethod
    def open(cls, ifname: str) -> Self:
        """Start capturing on `ifname`; raise `InterfaceError` naming it if that is impossible."""
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        try:
            sock.bind((ifname, ETH_P_ALL))
            hatype = sock.getsockname()[3]
            if hatype not in _LINKTYPES:
                raise InterfaceError(
                    errno.EINVAL, f"capture on {ifname}: unsupported hardware type {hatype}"
                )
            _grow_receive_buffer(sock)
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            if isinstance(e, InterfaceError):
                raise
            raise InterfaceError(e.errno, f"capture on {ifname}: {e.strerror}") from None
        return cls(sock, ifname, hatype)

    def fileno(self) -> int:
        """The socket's descriptor, for readiness polling."""
        return self._sock.fileno()

    def recv(self) -> tuple[float, int, bytes] | None:
        """Return the next ``(timestamp_seconds, linktype, frame)``, or None if none is waiting."""
        while True:
            try:
                size, ancdata, _flags, address = self._sock.recvmsg_into(
                    [self._buf], self._ancbufsize
                )
            except BlockingIOError:
                return None
            if self._skip_outgoing and address[2] == PACKET_OUTGOING:
                continue
            self._received += 1
            return _timestamp(ancdata), self.linktype, bytes(self._view[:size])

    def stats(self) -> CaptureStats:
        """Frames received so far, and frames the kernel dropped since `open`."""
        raw = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _TPACKET_STATS.size)
        self._dropped += _TPACKET_STATS.unpack(raw)[1]  # reading the counters resets them
        return CaptureStats(self._received, self._dropped)

    def close(self) -> None:
        """Stop capturing."""
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _grow_receive_buffer(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, _RCVBUF)
    except PermissionError:  # without CAP_NET_ADMIN, take what net.core.rmem_max allows
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)


def _timestamp(ancdata: list[tuple[int, int, bytes]]) -> float:
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
            sec: int
            nsec: int
            sec, nsec = _TIMESPEC.unpack(data)
            return sec + nsec / 1e9
    return time.time()
