"""What a segment that hits a connection in TIME_WAIT does: the one place this is decided.

A connection is in TIME_WAIT once both peers are >= FIN_WAIT_2 (both FINs acknowledged)
or an RST ended it. pf would keep tracking it with the full window algorithm for
``tcp.closed`` seconds; here, as in NetBSD's TIME_WAIT (tcp_vtw_input), only four things
can happen, and they happen the same way whether the connection is held as a full state
(``net.inet.tcp.vtw.enable=0``) or as a vestigial record (``=1``):

- REOPEN: a pure SYN frees the old connection and starts a new one from this SYN;
- CLOSE: an RST whose sequence number is exactly the sender's next one removes it
  (and passes, so the host that still holds TIME_WAIT hears it);
- PASS: a retransmission - an ACK, FIN/ACK or old data that adds no sequence space,
  at most one window old, acknowledging nothing the other side never sent - passes and
  restarts the TIME_WAIT timer (a lost last ACK makes the other end retransmit its FIN);
- BLOCK: anything else (new data after close, stray SYN/ACKs, out-of-window segments)
  is a ``state-mismatch``.

The check reads plain numbers so both holders can call it without building objects.
"""

from __future__ import annotations

from statetable.decode import TH_ACK, TH_FIN, TH_RST, TH_SYN
from statetable.state import WSCALE_MASK
from statetable.tcp import MAXACKWINDOW, SYN_ONLY_MASK, H, M

PASS, BLOCK, CLOSE, REOPEN = range(4)


def segment(
    flags: int,
    seq: int,
    ack: int,
    dlen: int,
    src_seqlo: int,
    src_wscale: int,
    dst_seqlo: int,
    dst_max_win: int,
    dst_wscale: int,
) -> int:
    """PASS, BLOCK, CLOSE or REOPEN for one segment from ``src`` to ``dst``."""
    if flags & SYN_ONLY_MASK == TH_SYN:
        return REOPEN
    if flags & TH_RST:
        return CLOSE if seq == src_seqlo else BLOCK
    if flags & TH_SYN or not flags & TH_ACK:
        return BLOCK
    end = (seq + dlen + (flags & TH_FIN)) & M
    if ((src_seqlo - end) & M) >= H:
        return BLOCK  # new sequence space: data after close
    if src_wscale and dst_wscale:
        sws, dws = src_wscale & WSCALE_MASK, dst_wscale & WSCALE_MASK
    else:
        sws = dws = 0
    if ((seq - src_seqlo + max(dst_max_win << dws, 1)) & M) >= H:
        return BLOCK  # more than one window old
    if ((dst_seqlo - ack) & M) > (MAXACKWINDOW << sws):
        return BLOCK  # acks unsent data, or far too old
    return PASS
