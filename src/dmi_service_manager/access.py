"""Who is asking, and may they in: IP_WHITELIST and TRUSTED_PROXIES.

The original's rule, kept exactly: start from the TCP peer; while the address in hand is a trusted
proxy, step one address left in X-Forwarded-For; the first untrusted address is the client. A header
sent by an untrusted peer is therefore never believed. Both lists also take CIDR ranges.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Containers post progress to /status_update/ from the host itself (host networking): exactly that
# route, from loopback, is open whatever IP_WHITELIST says.
LOOPBACK_ROUTES = frozenset({("POST", "/status_update"), ("POST", "/status_update/")})


def _networks(items: Iterable[str]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(item, strict=False) for item in items)


_LONGEST_ADDRESS = 64  # "[an IPv6 address with a zone]:port"; anything longer is no address


def _address(text: str) -> IPAddress | None:
    """An address as peers and proxies write it, or None. Only short texts reach the cache: a client may
    send any X-Forwarded-For, and a cache keyed on it would keep what it sent."""
    text = text.strip()
    return _parsed(text) if len(text) <= _LONGEST_ADDRESS else None


@functools.lru_cache(maxsize=4096)
def _parsed(text: str) -> IPAddress | None:
    if text.startswith("[") and "]" in text:  # "[::1]:443" as some proxies write it
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # "1.2.3.4:5678"
        text = text.split(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def is_loopback(address: str) -> bool:
    """Whether an address (as the access middleware records the caller's) is this host."""
    parsed = _address(address)
    return parsed is not None and parsed.is_loopback


@dataclass(frozen=True)
class Caller:
    address: str


class AccessPolicy:
    def __init__(self, whitelist: Iterable[str], trusted_proxies: Iterable[str]) -> None:
        self.whitelist = _networks(whitelist)
        self.trusted = _networks(trusted_proxies)

    def _is_trusted(self, address: IPAddress) -> bool:
        return any(address in net for net in self.trusted)

    def caller(self, peer: str | None, forwarded_for: str | None) -> Caller:
        """The client's address after walking back through trusted proxies."""
        current = _address(peer or "")
        if current is None:
            return Caller(address=peer or "")
        if not forwarded_for or not self._is_trusted(current):
            return Caller(address=str(current))  # the header is not even read
        hops = [h for h in forwarded_for.split(",") if h.strip()]
        while self._is_trusted(current) and hops:
            previous = _address(hops.pop())
            if previous is None:
                break
            current = previous
        return Caller(address=str(current))

    def allows(self, address: str, path: str, peer: str | None = None, method: str = "POST",
               forwarded: bool = False) -> bool:
        """Whether the caller (`address`, after trusted proxies) may send `method` to `path`. The exemption
        is the progress route exactly (a POST), and needs both the caller and the TCP peer on loopback: a
        proxy's own loopback is another host's. Nor is a request `forwarded` (a trusted proxy sent it with
        X-Forwarded-For) exempt: the proxy relayed it from elsewhere, and an empty or unreadable header
        would leave the proxy's own loopback address as the caller; a container sends no such header."""
        if not self.whitelist:
            return True
        parsed = _address(address)
        if parsed is None:
            return False
        if (parsed.is_loopback and (method, path) in LOOPBACK_ROUTES and (peer is None or is_loopback(peer))
                and not forwarded):
            return True
        return any(parsed in net for net in self.whitelist)

    def may_connect(self, peer: str) -> bool:
        """Whether a TCP peer may hold a connection at all: refused hosts are dropped before any request.

        A trusted proxy speaks for others, and loopback may always post progress, so both get as far
        as the request, where `allows` decides.
        """
        if not self.whitelist:
            return True
        address = _address(peer)
        if address is None:
            return True  # a Unix socket: the file's permissions decide
        return address.is_loopback or self._is_trusted(address) or any(address in net for net in self.whitelist)

    def peer_is_trusted(self, peer: str | None) -> bool:
        """Whether forwarded Host/Proto/Prefix headers from this peer may shape our URLs."""
        address = _address(peer or "")
        return address is not None and self._is_trusted(address)
