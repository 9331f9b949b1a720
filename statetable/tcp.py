"""pf's TCP sequence-window tracking (pf.c pf_tcp_track_full), for one packet.

This is the heart of the table; it follows pf line by line so that anyone who knows
pf.c can check it. Sequence numbers are 32-bit and compared modulo 2**32, as SEQ_GEQ
does: ``a`` is at or after ``b`` when ``(a - b) & M < H``. Those comparisons are written
inline rather than as helper calls because this runs for every TCP packet (a call costs
about as much as the comparison it wraps; see bench/bench_track.py).

Not carried over from pf: sequence-number modulation (``seqdiff`` is always 0), scrub /
normalisation, SACK-block checks (pf skips them too) and TCP timestamps.
"""

from __future__ import annotations

from statetable.decode import TH_ACK, TH_FIN, TH_RST, TH_SYN
from statetable.state import (
    CLOSING,
    ESTABLISHED,
    FIN_WAIT_2,
    SYN_SENT,
    TIME_WAIT,
    U16,
    WSCALE_FLAG,
    WSCALE_MASK,
    Peer,
    State,
)
from statetable.timeouts import TCP_CLOSED, TCP_CLOSING, TCP_ESTABLISHED, TCP_FINWAIT, TCP_OPENING

# Sequence arithmetic modulo 2**32: M masks a difference, H is its sign bit (SEQ_GEQ).
M = 0xFFFFFFFF
H = 0x80000000
# flags & SYN_ONLY_MASK == TH_SYN: a pure SYN (no ACK, RST or FIN), the only creator.
SYN_ONLY_MASK = TH_SYN | TH_ACK | TH_RST | TH_FIN
# Acks may lag by one window plus one MTU-sized segment (pf: 1500 "fudge factor").
MAXACKWINDOW = 0xFFFF + 1500
TCP_MAXWIN = 0xFFFF


def track(
    st: State, fwd: bool, flags: int, seq: int, ack: int, win: int, dlen: int, opt: int, now: float
) -> bool:
    """Advance ``st`` with one segment; False means out of window (``state-mismatch``).

    ``fwd`` is True when the segment comes from the state's source (the initiator).
    ``opt`` is the SYN's window-scale option in pf's encoding (0x80 | shift) or 0.
    """
    src: Peer
    dst: Peer
    if fwd:
        src, dst = st, st.dst
    else:
        src, dst = st.dst, st
    if src.wscale and dst.wscale and not flags & TH_SYN:
        sws = src.wscale & WSCALE_MASK
        dws = dst.wscale & WSCALE_MASK
    else:
        sws = dws = 0

    if src.seqlo == 0:
        # First packet from this end: set up its window.
        end = seq + dlen
        if flags & TH_SYN:
            end += 1
            if dst.wscale & WSCALE_FLAG:
                src.wscale = opt
                if opt & WSCALE_FLAG:
                    # Remove the scale factor from the initial window.
                    sws = opt & WSCALE_MASK
                    win = (win + (1 << sws) - 1) >> sws
                    dws = dst.wscale & WSCALE_MASK
                else:
                    # The other side offered scaling, this one did not: no scaling at all.
                    dst.max_win = min(TCP_MAXWIN, dst.max_win << (dst.wscale & WSCALE_MASK))
                    dst.wscale = 0
        data_end = end & M
        if flags & TH_FIN:
            end += 1
        end &= M
        src.seqlo = seq
        if src.state < SYN_SENT:
            src.state = SYN_SENT
        # Slide the window: seqhi may have been set before we saw this end's first packet.
        hi = (end + max(1, dst.max_win << dws)) & M
        if src.seqhi == 1 or ((hi - src.seqhi) & M) < H:
            src.seqhi = hi
        if win > src.max_win:
            src.max_win = U16[win]
    else:
        end = seq + dlen
        if flags & TH_SYN:
            end += 1
        data_end = end & M
        if flags & TH_FIN:
            end += 1
        end &= M

    if not flags & TH_ACK:
        ack = dst.seqlo  # let it pass the ack-skew check
    elif (ack == 0 and flags & TH_RST) or dst.state < SYN_SENT:
        # Stacks send RST|ACK with ack 0, and FIN|ACK with an ack for a SYN never seen.
        ack = dst.seqlo

    orig_seq = seq
    if seq == end:
        # Ease sequencing restrictions on segments without data.
        seq = data_end = end = src.seqlo

    ackskew = ((dst.seqlo - ack + H) & M) - H
    seqlo = src.seqlo
    in_window = (
        ((src.seqhi - data_end) & M) < H  # inside their window
        and ((seq - seqlo + (dst.max_win << dws)) & M) < H  # <= one window back
        and -MAXACKWINDOW <= ackskew <= (MAXACKWINDOW << sws)  # ack within a window
        and (
            not flags & TH_RST
            or orig_seq == seqlo  # exact-ish RST
            or orig_seq == ((seqlo + 1) & M)
            or ((orig_seq + 1) & M) == seqlo
        )
    )
    if not in_window and not (
        (dst.state < SYN_SENT or dst.state >= FIN_WAIT_2 or src.state >= FIN_WAIT_2)
        and ((src.seqhi + MAXACKWINDOW - data_end) & M) < H
        and ((seq - seqlo + MAXACKWINDOW) & M) < H
    ):
        return False
    # In window, or a loose match (shotgunned SYNs, a stream picked up mid-way, stray
    # segments right after close): either way the windows move.
    if src.max_win < win:
        src.max_win = U16[win]
    if 0 < ((end - seqlo) & M) < H:  # SEQ_GT(end, seqlo)
        src.seqlo = end
    scaled = win << sws
    if ((ack + scaled - dst.seqhi) & M) < H:
        dst.seqhi = (ack + (scaled or 1)) & M
    if not in_window:
        # A loose match moves no timeout (so floods age out).
        if flags & TH_FIN and src.state < CLOSING:
            src.state = CLOSING
        if flags & TH_RST:
            src.state = dst.state = TIME_WAIT
        return True
    if flags & TH_SYN and src.state < SYN_SENT:
        src.state = SYN_SENT
    if flags & TH_FIN and src.state < CLOSING:
        src.state = CLOSING
    if flags & TH_ACK:
        if dst.state == SYN_SENT:
            dst.state = ESTABLISHED
        elif dst.state == CLOSING:
            dst.state = FIN_WAIT_2
    if flags & TH_RST:
        src.state = dst.state = TIME_WAIT
    st.expire = now
    s, d = src.state, dst.state
    if s >= FIN_WAIT_2 and d >= FIN_WAIT_2:
        st.timeout = TCP_CLOSED
    elif s >= CLOSING and d >= CLOSING:
        st.timeout = TCP_FINWAIT
    elif s < ESTABLISHED or d < ESTABLISHED:
        st.timeout = TCP_OPENING
    elif s >= CLOSING or d >= CLOSING:
        st.timeout = TCP_CLOSING
    else:
        st.timeout = TCP_ESTABLISHED
    return True


def init_state(st: State, flags: int, seq: int, win: int, dlen: int, opt: int) -> None:
    """Set up a new state from its first segment, a SYN (pf_create_state, TCP part)."""
    st.seqlo = seq
    seqhi = seq + dlen + 1
    if flags & TH_SYN:
        seqhi += 1
        st.wscale = opt
    win = max(win, 1)
    if opt & WSCALE_MASK:
        shift = opt & WSCALE_MASK
        win = (win + (1 << shift) - 1) >> shift
    st.max_win = U16[win]
    if flags & TH_FIN:
        seqhi += 1
    st.seqhi = seqhi & M
    st.state = SYN_SENT
    dst = st.dst
    dst.seqhi = 1
    dst.max_win = 1
