"""The networks this host is attached to, read from the kernel over rtnetlink.

An RTM_GETADDR dump lists every address of every interface in one request. The older ioctl
route (SIOCGIFCONF / SIOCGIFADDR) cannot do that: it reports one IPv4 address per interface,
so secondary and additional IPv4 addresses are missed, and it knows nothing of IPv6.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct

from statetable.mslt import Network

# <linux/netlink.h>, <linux/rtnetlink.h>, <linux/if_addr.h>
_NLMSGHDR = struct.Struct("=IHHII")  # nlmsg_len, nlmsg_type, nlmsg_flags, nlmsg_seq, nlmsg_pid
_NLMSGERR = struct.Struct("=i")  # error: 0 or a negative errno (then the offending header)
_IFADDRMSG = struct.Struct("=BBBBI")  # ifa_family, ifa_prefixlen, ifa_flags, ifa_scope, ifa_index
_RTATTR = struct.Struct("=HH")  # rta_len, rta_type

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x01
NLM_F_MULTI = 0x02
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLM_F_DUMP_INTR = 0x10  # the address list changed during the dump; it may be inconsistent
RTM_NEWADDR = 20
RTM_GETADDR = 22
IFA_ADDRESS = 1
IFA_LOCAL = 2

_NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER
_ALIGN = 4  # NLMSG_ALIGNTO and RTA_ALIGNTO
_RECV_SIZE = 1 << 16  # above the kernel's largest dump batch (32 KiB)
_TIMEOUT = 5.0  # seconds; the kernel answers at once, so waiting longer means something is wrong
_DUMP_ATTEMPTS = 3  # an interrupted dump is retried, as addresses settle quickly
_ADDR_SIZES = {socket.AF_INET: 4, socket.AF_INET6: 16}


def local_networks() -> list[Network]:
    """Return the networks of all addresses on all interfaces in this network namespace.

    Each network is an address with its prefix length, host bits cleared. The result has no
    duplicates and is ordered IPv4 first, then IPv6, each sorted. Loopback networks
    (127.0.0.0/8 and ::1/128) are left out, because callers classify loopback separately.
    Raises OSError if the kernel cannot be asked.
    """
    try:
        for _ in range(_DUMP_ATTEMPTS):
            entries, interrupted = _dump_addresses()
            if not interrupted:
                break
        else:
            raise OSError(errno.EINTR, "address dump kept being interrupted by address changes")
    except OSError as e:
        code = e.errno or (errno.ETIMEDOUT if isinstance(e, TimeoutError) else errno.EIO)
        reason = e.strerror or str(e)
        raise OSError(code, f"cannot list interface addresses over netlink: {reason}") from e
    networks = {
        ipaddress.ip_network((ipaddress.ip_address(raw), prefixlen), strict=False)
        for raw, prefixlen in entries
    }
    networks = {n for n in networks if not n.is_loopback}  # 127.0.0.0/8 and ::1/128
    v4 = sorted(n for n in networks if isinstance(n, ipaddress.IPv4Network))
    v6 = sorted(n for n in networks if isinstance(n, ipaddress.IPv6Network))
    return [*v4, *v6]


def parse_networks(texts: list[str]) -> list[Network]:
    """Parse CIDR strings given by the user (such as ``--local-net`` values), in order.

    Host bits are allowed and cleared ("10.0.0.1/8" is 10.0.0.0/8); an address without a
    prefix is a single-host network. Raises ValueError with a one-line message on bad input.
    """
    networks: list[Network] = []
    for text in texts:
        # Parsing as the one family the text can be gives a precise reason ("'33' is not a
        # valid netmask"); ip_network() would try both and only say it matches neither.
        kind = ipaddress.IPv6Network if ":" in text else ipaddress.IPv4Network
        try:
            networks.append(kind(text, strict=False))
        except ValueError as e:
            reason = " ".join(str(e).split())  # the message must stay on one line
            raise ValueError(f"bad network {text!r}: {reason}") from None
    return networks


def _dump_addresses() -> tuple[list[tuple[bytes, int]], bool]:
    """Run one RTM_GETADDR dump: (address bytes, prefix length) pairs, and whether it was
    interrupted by a concurrent change."""
    seq = 1
    request = _NLMSGHDR.pack(
        _NLMSGHDR.size + _IFADDRMSG.size, RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, seq, 0
    ) + _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)  # AF_UNSPEC: both IPv4 and IPv6
    entries: list[tuple[bytes, int]] = []
    interrupted = False
    buf = bytearray(_RECV_SIZE)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(_TIMEOUT)
        sock.bind((0, 0))  # the kernel picks our port id
        sock.sendto(request, (0, 0))  # pid 0: the kernel
        while True:
            # MSG_TRUNC makes recv report the full datagram length, so a cut one is noticed.
            size = sock.recv_into(buf, 0, socket.MSG_TRUNC)
            if size > len(buf):
                raise OSError(errno.EMSGSIZE, f"netlink message of {size} bytes was truncated")
            for msg_type, flags, msg_seq, payload in _messages(memoryview(buf)[:size]):
                if msg_seq != seq:
                    continue  # not an answer to our request
                interrupted |= bool(flags & NLM_F_DUMP_INTR)
                if msg_type == NLMSG_DONE:
                    _check_done(payload)
                    return entries, interrupted
                if msg_type == NLMSG_ERROR:
                    _check_error(payload)
                    return entries, interrupted  # error 0: an acknowledgement, the end
                if msg_type == RTM_NEWADDR:
                    entry = _parse_address(payload)
                    if entry is not None:
                        entries.append(entry)
                if not flags & NLM_F_MULTI:
                    return entries, interrupted  # a single-part answer ends here


def _messages(data: memoryview) -> list[tuple[int, int, int, memoryview]]:
    """Split one datagram into netlink messages: (type, flags, seq, payload)."""
    messages = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, msg_type, flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            raise OSError(errno.EBADMSG, f"malformed netlink message (length {length})")
        messages.append((msg_type, flags, seq, data[offset + _NLMSGHDR.size : offset + length]))
        offset += _align(length)
    return messages


def _check_done(payload: memoryview) -> None:
    # NLMSG_DONE carries the dump's result; a negative one means the dump failed part-way.
    if len(payload) >= _NLMSGERR.size:
        (error,) = _NLMSGERR.unpack_from(payload)
        if error < 0:
            raise OSError(-error, f"RTM_GETADDR dump failed: {os.strerror(-error)}")


def _check_error(payload: memoryview) -> None:
    if len(payload) < _NLMSGERR.size:
        raise OSError(errno.EBADMSG, "truncated netlink error message")
    (error,) = _NLMSGERR.unpack_from(payload)
    if error < 0:
        raise OSError(-error, f"RTM_GETADDR failed: {os.strerror(-error)}")


def _parse_address(payload: memoryview) -> tuple[bytes, int] | None:
    """The (address, prefix length) of one RTM_NEWADDR message, or None if not IPv4/IPv6."""
    if len(payload) < _IFADDRMSG.size:
        raise OSError(errno.EBADMSG, "truncated ifaddrmsg")
    family, prefixlen, _flags, _scope, _index = _IFADDRMSG.unpack_from(payload)
    size = _ADDR_SIZES.get(family)
    if size is None:
        return None
    attrs = _attributes(payload[_align(_IFADDRMSG.size) :])
    # On a point-to-point address IFA_ADDRESS is the peer and IFA_LOCAL our own address; the
    # kernel sends IFA_LOCAL for every IPv4 address but for IPv6 only when there is a peer.
    raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
    if raw is None or len(raw) != size:
        return None
    return raw, prefixlen


def _attributes(data: memoryview) -> dict[int, bytes]:
    """The rtattrs of one message, by type (a later duplicate wins)."""
    attrs = {}
    offset = 0
    while offset + _RTATTR.size <= len(data):
        length, attr_type = _RTATTR.unpack_from(data, offset)
        attr_type &= _NLA_TYPE_MASK
        if length < _RTATTR.size or offset + length > len(data):
            raise OSError(errno.EBADMSG, f"malformed rtattr (length {length})")
        attrs[attr_type] = bytes(data[offset + _RTATTR.size : offset + length])
        offset += _align(length)
    return attrs


def _align(length: int) -> int:
    return (length + _ALIGN - 1) & ~(_ALIGN - 1)
