"""local_networks() against real kernel interfaces, and parse_networks() on user input.

The namespace tests build interfaces with `ip` in a private network namespace and read them
back over netlink from inside it; the host test compares with `ip -j addr` as an independent
oracle (iproute2 reads the same dump, but parses it with its own code).
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Iterator

import pytest

from pfsync.netif import local_networks, parse_networks
from statetable.mslt import Network
from tests import traffic

LINK_LOCAL_V6 = ipaddress.ip_network("fe80::/64")
LOOPBACK = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def net(text: str) -> Network:
    return ipaddress.ip_network(text)


def assert_ordered(networks: list[Network]) -> None:
    """No duplicates; IPv4 first, then IPv6, each sorted."""
    v4 = [n for n in networks if n.version == 4]
    v6 = [n for n in networks if n.version == 6]
    assert networks == sorted(set(v4)) + sorted(set(v6))


@pytest.fixture
def veth_ns() -> Iterator[str]:
    """A fresh namespace with `lo` up and a veth pair nif0/nif1, both ends up and unaddressed.

    A veth pair rather than a dummy: the dummy driver may not be available.
    """
    with traffic.netns("pfnif") as ns:
        ip("-n", ns, "link", "add", "nif0", "type", "veth", "peer", "name", "nif1")
        for ifname in ("nif0", "nif1"):
            ip("-n", ns, "link", "set", ifname, "up")
        yield ns


def networks_in(ns: str) -> list[Network]:
    with traffic.entered_netns(ns):
        return local_networks()


# --- local_networks() in a private namespace ----------------------------------------------------


def test_only_loopback_gives_nothing() -> None:
    with traffic.netns("pfnif") as ns:
        assert "127.0.0.1/8" in ip("-n", ns, "addr", "show", "dev", "lo")
        assert networks_in(ns) == []


def test_all_addresses_of_all_interfaces(veth_ns: str) -> None:
    ns = veth_ns
    for address in ("10.77.1.5/24", "10.77.2.9/16", "10.77.1.6/24"):
        ip("-n", ns, "addr", "add", address, "dev", "nif0")
    ip("-n", ns, "addr", "add", "fd00:77::5/64", "dev", "nif0", "nodad")
    ip("-n", ns, "addr", "add", "192.168.77.1/30", "dev", "nif1")
    ip("-n", ns, "addr", "add", "fd00:78::1:2/112", "dev", "nif1", "nodad")
    # 10.77.1.6/24 shares its primary's subnet, so the kernel marks it secondary; 10.77.2.9/16
    # is a second primary, which SIOCGIFADDR would not report either.
    assert "10.77.1.6/24 scope global secondary" in ip("-n", ns, "addr", "show", "dev", "nif0")

    networks = networks_in(ns)

    expected = {
        net("10.77.1.0/24"),
        net("10.77.0.0/16"),
        net("fd00:77::/64"),
        net("192.168.77.0/30"),
        net("fd00:78::1:0/112"),
    }
    assert expected <= set(networks)
    assert set(networks) - expected <= {LINK_LOCAL_V6}  # the kernel's own fe80:: addresses
    assert not set(LOOPBACK) & set(networks)
    assert_ordered(networks)


def test_point_to_point_uses_the_local_address(veth_ns: str) -> None:
    ns = veth_ns
    ip("-n", ns, "addr", "add", "10.88.0.1", "peer", "10.88.0.2/32", "dev", "nif0")
    ip("-n", ns, "addr", "add", "fd00:88::1", "peer", "fd00:88::2/128", "dev", "nif0", "nodad")

    networks = networks_in(ns)

    assert net("10.88.0.1/32") in networks
    assert net("fd00:88::1/128") in networks
    assert net("10.88.0.2/32") not in networks
    assert net("fd00:88::2/128") not in networks


def test_non_loopback_address_on_lo_is_kept() -> None:
    """Loopback is excluded by network, not by interface: a service address on lo counts."""
    with traffic.netns("pfnif") as ns:
        ip("-n", ns, "addr", "add", "10.99.9.9/32", "dev", "lo")
        assert networks_in(ns) == [net("10.99.9.9/32")]


def test_many_addresses_span_several_netlink_messages(veth_ns: str) -> None:
    """Enough addresses that the dump needs several datagrams (about 80 bytes per address)."""
    ns = veth_ns
    subnets = list(ipaddress.IPv4Network("10.64.0.0/14").subnets(new_prefix=24))[:600]
    batch = "".join(f"addr add {s.network_address + 1}/24 dev nif0\n" for s in subnets)
    subprocess.run(["ip", "-n", ns, "-batch", "-"], input=batch, text=True, check=True)

    networks = networks_in(ns)

    assert [n for n in networks if n.version == 4] == subnets


# --- local_networks() on this host --------------------------------------------------------------


def ip_addr_oracle() -> tuple[set[ipaddress.IPv4Address | ipaddress.IPv6Address], set[Network]]:
    """Every local address `ip -j addr` shows, and the non-loopback networks they make."""
    addresses, networks = set(), set()
    for link in json.loads(ip("-j", "addr", "show")):
        for info in link.get("addr_info", []):
            if info.get("family") not in ("inet", "inet6"):
                continue
            interface = ipaddress.ip_interface(f"{info['local']}/{info['prefixlen']}")
            addresses.add(interface.ip)
            if not interface.network.is_loopback:
                networks.add(interface.network)
    return addresses, networks


def test_host_networks_match_ip_addr() -> None:
    networks = local_networks()
    addresses, oracle = ip_addr_oracle()

    for network in networks:
        assert any(a in network for a in addresses), f"{network} holds no address of ip addr"
    assert set(networks) == oracle
    assert not set(LOOPBACK) & set(networks)
    assert_ordered(networks)


# --- parse_networks() ---------------------------------------------------------------------------


def test_parse_networks_accepts_cidr() -> None:
    assert parse_networks(["10.0.0.1/8", "fd00::/64", "fd00::5/64", "192.0.2.7"]) == [
        net("10.0.0.0/8"),
        net("fd00::/64"),
        net("fd00::/64"),
        net("192.0.2.7/32"),
    ]
    assert parse_networks([]) == []


@pytest.mark.parametrize(
    "text", ["10.0.0.0/33", "nonsense", "", "fd00::/129", "10.0.0.0\n/8", "10.0.0.0/8 "]
)
def test_parse_networks_rejects_bad_input(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_networks(["10.0.0.0/8", text])
    message = str(info.value)
    assert message.startswith(f"bad network {text!r}: ")
    assert len(message) > len(f"bad network {text!r}: ")  # a reason follows
    assert "\n" not in message
