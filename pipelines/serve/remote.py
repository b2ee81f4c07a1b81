"""Fetching a remote (http/https) request image without becoming a proxy into the network.

Only when the recipe enables remote images, and then: the host must be on the allowlist
(``limits.remote_image_domains``: exact names, or ``.example.com`` for its subdomains); its
name is resolved once and every address must be public (private, loopback, link-local and
cloud-metadata addresses, multicast, reserved and unspecified ones are refused); the connection
goes to those resolved addresses (TLS still checks the certificate against the host name), so
a second DNS answer cannot redirect it; each address is tried in turn, IPv4 first, until one
accepts the connection (an IPv4-only pod still reaches a dual-stack host); redirects are
refused unless ``remote_image_max_redirects`` allows them, each hop checked again the same way;
the size limit holds while the body streams; and the whole fetch has one deadline.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

from pipelines.serve.errors import APIError, bad_request

log = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[list[str]]]
METADATA_ADDRESSES = {ipaddress.ip_address(a) for a in
                      ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")}


def _refused(message: str) -> APIError:
    return bad_request(message, code="image_url_not_allowed")


def host_allowed(host: str, domains: Sequence[str]) -> bool:
    """Whether ``host`` is on the allowlist (``a.com`` exactly; ``.a.com`` its subdomains)."""
    host = host.lower().rstrip(".")
    for entry in domains:
        entry = entry.lower().rstrip(".")
        if entry.startswith(".") and host.endswith(entry) and host != entry[1:]:
            return True
        if host == entry:
            return True
    return False


def address_allowed(address: str) -> bool:
    """Only public unicast addresses (IPv4-mapped IPv6 judged as the IPv4 inside)."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in METADATA_ADDRESSES:
        return False
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified
                                 or ip.is_loopback or ip.is_link_local or ip.is_private)


async def resolve(host: str, port: int) -> list[str]:
    """Every address of ``host`` (one DNS lookup), in the resolver's order."""
    infos = await asyncio.to_thread(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def ipv4_first(addresses: Sequence[str]) -> list[str]:
    """The addresses with IPv4 ones first, each family in its given order."""
    return sorted(addresses, key=lambda a: ipaddress.ip_address(a).version)


async def _checked_target(url: str, domains: Sequence[str],
                          resolver: Resolver) -> tuple[str, str, list[str], int]:
    """(scheme, host, its public addresses IPv4 first, port) of an allowed URL."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise _refused(f"image URL {url[:80]!r} is not an http(s) URL with a host")
    if parts.username or parts.password:
        raise _refused("image URLs with credentials are not accepted")
    host = parts.hostname
    try:
        ipaddress.ip_address(host)
        literal = True
    except ValueError:
        literal = False
    if literal or not host_allowed(host, domains):
        raise _refused(f"image host {host!r} is not on this server's allowlist "
                       "(limits.remote_image_domains)")
    port = parts.port or (443 if scheme == "https" else 80)
    try:
        addresses = await resolver(host, port)
    except OSError as exc:
        raise bad_request(f"image host {host!r} cannot be resolved: {exc}",
                          code="invalid_image_url") from None
    bad = [a for a in addresses if not address_allowed(a)]
    if not addresses or bad:
        raise _refused(f"image host {host!r} resolves to a non-public address")
    return scheme, host, ipv4_first(addresses), port


def _pinned_request(client: httpx.AsyncClient, url: str, scheme: str, host: str, address: str,
                    port: int) -> httpx.Request:
    """GET ``url`` from ``address`` (the name only in Host and for TLS)."""
    parts = urlsplit(url)
    ip_host = f"[{address}]" if ":" in address else address
    pinned = urlunsplit((scheme, f"{ip_host}:{port}", parts.path or "/", parts.query, ""))
    default_port = port == (443 if scheme == "https" else 80)
    headers = {"Host": host if default_port else f"{host}:{port}",
               "Accept": "image/*", "Accept-Encoding": "identity"}
    return client.build_request("GET", pinned, headers=headers,
                                extensions={"sni_hostname": host})


async def _connect(url: str, scheme: str, host: str, addresses: list[str], port: int,
                   deadline: float) -> tuple[httpx.AsyncClient, httpx.Response]:
    """Send the request to each address in turn until one connects; each try may take its
    share of the time left, so a dead first address cannot use up the deadline."""
    failure: Exception | None = None
    for i, address in enumerate(addresses):
        remaining = max(0.1, deadline - time.monotonic())
        timeout = httpx.Timeout(remaining, connect=remaining / (len(addresses) - i))
        client = httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False)
        try:
            request = _pinned_request(client, url, scheme, host, address, port)
            return client, await client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            await client.aclose()
            log.info("image host %s: %s did not accept a connection (%s)", host, address,
                     type(exc).__name__)
            failure = exc
        except BaseException:
            await client.aclose()
            raise
    assert failure is not None  # addresses is never empty (_checked_target)
    raise failure


async def fetch_remote(url: str, *, domains: Sequence[str], max_bytes: int, timeout_s: float,
                       max_redirects: int = 0, resolver: Resolver = resolve) -> bytes:
    """Download an allowed http(s) image, at most ``max_bytes``, within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            for _hop in range(max_redirects + 1):
                scheme, host, addresses, port = await _checked_target(url, domains, resolver)
                client, response = await _connect(url, scheme, host, addresses, port,
                                                  deadline)
                try:
                    if response.is_redirect:
                        url = urljoin(url, response.headers.get("location", ""))
                        continue
                    return await _body(response, max_bytes)
                finally:
                    await response.aclose()
                    await client.aclose()
            raise _refused(f"the image URL redirects more than {max_redirects} time(s) "
                           "(limits.remote_image_max_redirects)")
    except TimeoutError:
        raise bad_request(f"fetching the image took longer than {timeout_s:g} s",
                          code="invalid_image_url") from None
    except httpx.HTTPError as exc:
        raise bad_request(f"the image URL cannot be fetched: {type(exc).__name__}",
                          code="invalid_image_url") from None


async def _body(response, max_bytes: int) -> bytes:
    if response.status_code != 200:
        raise bad_request(f"fetching the image gave HTTP {response.status_code}",
                          code="invalid_image_url")
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise bad_request(f"the image is larger than {max_bytes} bytes", code="image_too_large")
    chunks, size = [], 0
    async for chunk in response.aiter_raw():
        size += len(chunk)
        if size > max_bytes:
            raise bad_request(f"the image is larger than {max_bytes} bytes",
                              code="image_too_large")
        chunks.append(chunk)
    return b"".join(chunks)
