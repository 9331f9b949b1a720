"""Live capture on Linux: an AF_PACKET socket with a TPACKET_V3 memory-mapped receive ring.

Why a ring: one ``recvmsg`` per frame costs a system call and a copy per frame, and a Python
reader doing that falls behind a busy veth long before the table does (BENCHMARKS.md,
"Live capture"). With TPACKET_V3 the kernel writes frames into blocks of a ring shared with
us and hands over a whole block at a time (when it is full, or ``retire_ms`` after its first
frame); one wake-up then reads every frame of the block with no system call at all.

The ring is ``blocks`` blocks of ``block_size`` bytes. A block is ours while its status has
``TP_STATUS_USER``; we give it back by writing ``TP_STATUS_KERNEL``, in ring order. When every
block is ours the kernel has nowhere to put a frame and drops it: ``PACKET_STATISTICS``
counts those drops (``tp_drops``), which `stats()` adds up as the interface's drops.

The socket is made with protocol 0 (it receives nothing) and only starts receiving when it is
bound to the interface with ETH_P_ALL, so no frame from another interface slips in between.
On a loopback device the kernel hands every frame to packet sockets twice, once as it leaves
(PACKET_OUTGOING) and once as it arrives (PACKET_HOST); the outgoing copy is dropped here, as
libpcap does. On other devices the outgoing frames are real traffic and are kept.

An interface that goes down or is deleted while captured makes the kernel report ENETDOWN on
the socket (it becomes readable with an error): `read_batch` raises `InterfaceGone` when the
interface no longer exists; a mere link-down is reported by `link_went_down()` and capture
resumes by itself when the link comes back up.
"""

from __future__ import annotations

import errno
import mmap
import socket
import struct
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from statetable.decode import LINKTYPE_ETHERNET, LINKTYPE_RAW

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
TPACKET_V3 = 2
PACKET_OUTGOING = 4

TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1

ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772  # lo frames carry an all-zero Ethernet header
ARPHRD_NONE = 65534  # tun, wireguard: bare IP packets

_LINKTYPES = {
    ARPHRD_ETHER: LINKTYPE_ETHERNET,
    ARPHRD_LOOPBACK: LINKTYPE_ETHERNET,
    ARPHRD_NONE: LINKTYPE_RAW,
}
# struct tpacket_req3: block_size, block_nr, frame_size, frame_nr, retire_blk_tov,
# sizeof_priv, feature_req_word.
_TPACKET_REQ3 = struct.Struct("@7I")
# struct tpacket_block_desc: version, offset_to_priv, then tpacket_hdr_v1's block_status,
# num_pkts, offset_to_first_pkt (the rest is not needed).
_BLOCK_HEAD = struct.Struct("@IIIII")
_BLOCK_STATUS_OFFSET = 8
_STATUS = struct.Struct("@I")
# struct tpacket3_hdr: tp_next_offset, tp_sec, tp_nsec, tp_snaplen, tp_len, tp_status, tp_mac.
_FRAME_HEAD = struct.Struct("@IIIIIIH")
# sockaddr_ll follows the 48-byte tpacket3_hdr; sll_pkttype is its byte 10.
_PKTTYPE_OFFSET = 48 + 10
# struct tpacket_stats_v3: tp_packets (includes drops), tp_drops, tp_freeze_q_cnt.
_TPACKET_STATS_V3 = struct.Struct("@III")

# 64 MiB of ring in many small blocks. A block that is not full is handed over RETIRE_MS
# after its first frame, so when the reader stalls at a modest rate each block holds only
# RETIRE_MS of traffic: the ring then covers BLOCKS x RETIRE_MS (2.5 s here), and more
# blocks cover longer stalls (64 blocks of 1 MiB covered 0.64 s: measured, BENCHMARKS.md).
BLOCK_SIZE = 256 * 1024  # above the largest GSO frame (64 KiB), so frames are never cut
BLOCKS = 256
RETIRE_MS = 10


class InterfaceError(OSError):
    """The interface cannot be captured on (missing, of an unsupported link type, no rights).

    Made as ``InterfaceError(errno, message)``; it prints as the message alone, one line.
    """

    def __str__(self) -> str:
        return str(self.strerror)


class InterfaceGone(InterfaceError):
    """The captured interface was deleted (or moved to another namespace) while captured."""


@dataclass(frozen=True)
class CaptureStats:
    """Counters of one capture: frames handed out, frames the kernel dropped for lack of room."""

    received: int
    dropped: int


Frame = tuple[float, int, bytes]  # (timestamp in seconds, pcap link type, frame)


class PacketCapture:
    """Frames of one interface, read without blocking from a TPACKET_V3 ring.

    `read_batch()` returns every frame of the blocks that are ready (possibly none); `recv()`
    returns one frame or None. Wait for readiness with `select`/`selectors` or an event
    loop's `add_reader` on `fileno()`.
    """

    def __init__(
        self,
        sock: socket.socket,
        ring: mmap.mmap,
        ifname: str,
        ifindex: int,
        hatype: int,
        block_size: int,
    ) -> None:
        self._sock = sock
        self._ring = ring
        self._view = memoryview(ring)
        self.ifname = ifname
        self.ifindex = ifindex
        self.linktype = _LINKTYPES[hatype]
        self._skip_outgoing = hatype == ARPHRD_LOOPBACK
        self._block_size = block_size
        self._blocks = len(ring) // block_size
        self._next_block = 0
        self._pending: deque[Frame] = deque()
        self._received = 0
        self._dropped = 0
        self._link_down = False

    @classmethod
    def open(
        cls,
        ifname: str,
        block_size: int = BLOCK_SIZE,
        blocks: int = BLOCKS,
        retire_ms: int = RETIRE_MS,
    ) -> Self:
        """Start capturing on `ifname`; raise `InterfaceError` naming it if that is impossible.

        `block_size` must be a multiple of the page size; the ring takes
        ``block_size * blocks`` bytes of locked kernel memory.
        """
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        except PermissionError:
            raise InterfaceError(
                errno.EPERM,
                f"capture on {ifname}: not permitted (live capture needs root or CAP_NET_RAW)",
            ) from None
        try:
            if not ifname or "\0" in ifname or len(ifname.encode()) >= 16:
                raise InterfaceError(errno.ENODEV, f"capture on {ifname!r}: no such interface")
            try:
                ifindex = socket.if_nametoindex(ifname)
            except OSError:
                raise InterfaceError(
                    errno.ENODEV, f"capture on {ifname}: no such interface"
                ) from None
            sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
            req = _TPACKET_REQ3.pack(
                block_size, blocks, block_size, blocks, retire_ms, 0, 0
            )  # frame_size/frame_nr only need to be consistent; V3 packs frames in blocks
            sock.setsockopt(SOL_PACKET, PACKET_RX_RING, req)
            ring = mmap.mmap(sock.fileno(), block_size * blocks, mmap.MAP_SHARED)
            try:
                sock.bind((ifname, ETH_P_ALL))
                hatype = sock.getsockname()[3]
                if hatype not in _LINKTYPES:
                    raise InterfaceError(
                        errno.EINVAL, f"capture on {ifname}: unsupported hardware type {hatype}"
                    )
                sock.setblocking(False)
                return cls(sock, ring, ifname, ifindex, hatype, block_size)
            except BaseException:
                ring.close()
                raise
        except OSError as e:
            sock.close()
            if isinstance(e, InterfaceError):
                raise
            if e.errno == errno.ENODEV:
                raise InterfaceError(e.errno, f"capture on {ifname}: no such interface") from None
            raise InterfaceError(e.errno, f"capture on {ifname}: {e.strerror}") from None

    def fileno(self) -> int:
        """The socket's descriptor, for readiness polling."""
        return self._sock.fileno()

    def read_batch(self, max_frames: int = 4096) -> list[Frame]:
        """Every frame of the ready blocks, whole blocks at a time, until at least `max_frames`.

        Returns an empty list when no block is ready. Raises `InterfaceGone` when the
        interface was deleted; the capture is then useless and should be closed.
        """
        out = list(self._pending)
        self._pending.clear()
        self._fill(out, max_frames)
        self._received += len(out)
        return out

    def recv(self) -> Frame | None:
        """Return the next ``(timestamp_seconds, linktype, frame)``, or None if none is waiting."""
        if not self._pending:
            batch: list[Frame] = []
            self._fill(batch, 1)
            self._pending.extend(batch)
        if not self._pending:
            return None
        self._received += 1
        return self._pending.popleft()

    def _fill(self, out: list[Frame], max_frames: int) -> None:
        """Append the frames of ready blocks to `out` until it holds `max_frames` or more.

        The hot path of live capture: locals and `unpack_from` on the mapped ring, one copy
        per frame (the block goes back to the kernel, so the frame cannot stay a view of it).
        """
        view, block_size, blocks = self._view, self._block_size, self._blocks
        block_head, frame_head = _BLOCK_HEAD.unpack_from, _FRAME_HEAD.unpack_from
        linktype, skip_outgoing = self.linktype, self._skip_outgoing
        append = out.append
        read_any = False
        while len(out) < max_frames:
            base = self._next_block * block_size
            _version, _priv, status, num_pkts, offset = block_head(view, base)
            if not status & TP_STATUS_USER:
                break
            read_any = True
            pos = base + offset
            for _ in range(num_pkts):
                next_offset, sec, nsec, snaplen, _len, _status, mac = frame_head(view, pos)
                if not (skip_outgoing and view[pos + _PKTTYPE_OFFSET] == PACKET_OUTGOING):
                    start = pos + mac
                    append((sec + nsec * 1e-9, linktype, bytes(view[start : start + snaplen])))
                pos += next_offset
            # Hand the block back only after every frame of it has been copied out.
            _STATUS.pack_into(view, base + _BLOCK_STATUS_OFFSET, TP_STATUS_KERNEL)
            self._next_block = (self._next_block + 1) % blocks
        if not read_any:
            self._check_error()

    def link_went_down(self) -> bool:
        """True once after the interface went down (it still exists; capture resumes when up)."""
        went, self._link_down = self._link_down, False
        return went

    def _check_error(self) -> None:
        err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # reading clears it
        if err != errno.ENETDOWN:
            return
        try:
            present = socket.if_nametoindex(self.ifname) == self.ifindex
        except OSError:
            present = False
        if not present:
            raise InterfaceGone(errno.ENODEV, f"capture on {self.ifname}: interface disappeared")
        self._link_down = True

    def stats(self) -> CaptureStats:
        """Frames received so far, and frames the kernel dropped since `open`."""
        raw = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _TPACKET_STATS_V3.size)
        self._dropped += _TPACKET_STATS_V3.unpack(raw)[1]  # reading the counters resets them
        return CaptureStats(self._received, self._dropped)

    def close(self) -> None:
        """Stop capturing and unmap the ring."""
        self._view.release()
        self._ring.close()
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
