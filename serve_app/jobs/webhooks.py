"""Webhook notifications of finished transcription jobs: the callback URL check, signing, delivery.

When a job with a `callback_url` succeeds, fails or is cancelled, the job runner POSTs a short
notification (`payload_for`: the job's id, status and links, never the transcript) to that URL.

Delivery is at least once. The runner records an attempt's outcome after making it, so a runner
that dies in between sends the same notification again; a receiver that answers late, or whose
2xx is lost, gets it again too. Every attempt of one notification carries the same
`X-KlipNote-Delivery` id (`"<job id>:<status>"`): receivers deduplicate by it. A failed attempt
(any answer but 2xx, a redirect included, or a transport error) is retried with exponential
backoff until `WebhookSettings.max_attempts`.

Signature: with a secret configured, `X-KlipNote-Signature: t=<unix seconds>,v1=<hex>` where the
hex is HMAC-SHA256, keyed with the secret, of `f"{t}."` followed by the raw request body. A
receiver recomputes it over the bytes it received, compares in constant time and refuses old
timestamps, which bounds replays (`verify` does exactly that). Without a secret deliveries go
unsigned: no signature header at all.

Address check: a callback URL makes the service send requests on behalf of whoever submitted
the job, so, unless `allow_private` is set (a receiver inside your own network), every address
its host stands for must be global: loopback, private, link-local (169.254.169.254 is the cloud
metadata service), shared, multicast, reserved and unspecified addresses are refused, IPv6 forms
that embed an IPv4 address (::ffff:127.0.0.1, NAT64, 6to4) by that address. The check runs when
the job is submitted and again before every delivery, on the addresses the host name resolves to
then: a name may be repointed in between (DNS rebinding). The delivery then connects to an
address that check approved rather than letting the HTTP client resolve the name once more, and
never follows redirects, which could lead anywhere.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import re
import socket
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, NamedTuple, Optional, Tuple, Union
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:  # httpx is imported where deliveries are made: the URL check needs only the standard library.
    import httpx

SIGNATURE_HEADER = "X-KlipNote-Signature"
"""`t=<unix seconds>,v1=<hex HMAC-SHA256 of f"{t}." + body>`; absent when no secret is configured."""

DELIVERY_HEADER = "X-KlipNote-Delivery"
"""The delivery id, `"<job id>:<status>"`: the same on every attempt of one notification."""

EVENT_HEADER = "X-KlipNote-Event"
""""job.succeeded", "job.failed" or "job.cancelled"."""

USER_AGENT = "KlipNote-Webhooks/1"

MAX_URL_LENGTH = 2048

_DEFAULT_PORTS = {"http": 80, "https": 443}
# Characters no URL we call may hold: parsers disagree about them (a backslash is a path
# separator to browsers and part of the host to urllib), which is how URL checks get bypassed.
_FORBIDDEN_URL_CHARS = re.compile(r"[\x00-\x20\x7f\\]")
# A host name as DNS carries it (after IDNA); underscores occur in real names.
_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?")
# Hosts that the C resolver reads as IPv4 addresses though `ipaddress` does not: 127.1, 0x7f.0.0.1, 2130706433.
_NUMERIC_HOST = re.compile(r"[0-9a-fx.]+")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


class CallbackURLError(ValueError):
    """A callback URL the service refuses to call.

    Args:
        message: Says what is wrong, for the client that submitted the URL.
        reason: A short stable code: "scheme" (not http or https), "host" (no host, userinfo,
            a malformed or over-long URL), "private_address" (an address that is not global,
            while private ones are not allowed) or "unresolvable" (the host name has no address).
    """

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class _Target(NamedTuple):
    """A checked callback URL, split into what a delivery needs."""

    url: str
    scheme: str
    host: str
    """The host as DNS and the Host header know it: IDNA-encoded, lower case; an IP literal without brackets."""
    port: int
    path_and_query: str
    literal: bool
    """Whether the host is an IP address rather than a name."""
    addresses: Tuple[IPAddress, ...]
    """Every address the host stands for (empty when the name was not resolved)."""


def _is_public(ip: IPAddress) -> bool:
    """Whether `ip` is a global unicast address."""
    if isinstance(ip, ipaddress.IPv6Address):
        # These forms reach the IPv4 address they embed, which is what decides.
        if ip.ipv4_mapped is not None:
            return _is_public(ip.ipv4_mapped)
        if ip in _NAT64:
            return _is_public(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip.sixtofour is not None and not _is_public(ip.sixtofour):
            return False
    # `is_global` alone lets multicast through, and its reserved ranges differ between Python versions.
    return ip.is_global and not (
        ip.is_multicast or ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_unspecified
    )


def _ip_literal(host: str) -> Optional[IPAddress]:
    """The address `host` spells, if it is an IP literal (in any form the resolver accepts)."""
    bare = host.removesuffix(".")
    try:
        return ipaddress.ip_address(bare)
    except ValueError:
        pass
    if _NUMERIC_HOST.fullmatch(bare):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(bare))
        except OSError:
            return None
    return None


def _resolve(host: str, port: int) -> Tuple[IPAddress, ...]:
    """Every address `host` resolves to now, in the resolver's order, without repeats."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise CallbackURLError(f"The callback URL's host {host!r} does not resolve.", "unresolvable") from e
    addresses: List[IPAddress] = []
    for family, _, _, _, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        ip = ipaddress.ip_address(sockaddr[0])
        if ip not in addresses:
            addresses.append(ip)
    if not addresses:
        raise CallbackURLError(f"The callback URL's host {host!r} does not resolve.", "unresolvable")
    return tuple(addresses)


def _check(url: str, *, allow_private: bool, resolve: bool) -> _Target:
    """`check_callback_url`, returning the parts of the URL and the addresses it was checked on."""
    url = url.strip()
    if len(url) > MAX_URL_LENGTH:
        raise CallbackURLError(f"The callback URL is longer than {MAX_URL_LENGTH} characters.", "host")
    if _FORBIDDEN_URL_CHARS.search(url):
        raise CallbackURLError("The callback URL holds spaces, control characters or backslashes.", "host")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise CallbackURLError(f"The callback URL is malformed: {e}.", "host") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise CallbackURLError("The callback URL must be an http or https URL.", "scheme")
    if "@" in parts.netloc:
        raise CallbackURLError("The callback URL must not hold a user name or password.", "host")
    if not parts.hostname:
        raise CallbackURLError("The callback URL has no host.", "host")
    if port is None:
        port = _DEFAULT_PORTS[scheme]

    ip = _ip_literal(parts.hostname)
    if ip is not None:
        host = str(ip)
    else:
        try:
            host = parts.hostname.encode("idna").decode("ascii")
        except UnicodeError:
            raise CallbackURLError("The callback URL's host is not a valid host name.", "host") from None
        if not _HOST_NAME.fullmatch(host):
            raise CallbackURLError("The callback URL's host is not a valid host name.", "host")

    if ip is not None:
        addresses: Tuple[IPAddress, ...] = (ip,)
    elif resolve:
        addresses = _resolve(host, port)
    else:
        addresses = ()
    if not allow_private:
        for address in addresses:
            if not _is_public(address):
                raise CallbackURLError(
                    "The callback URL's host is a private, loopback, link-local or otherwise non-public address; "
                    "this service only calls public addresses.",
                    "private_address",
                )

    path_and_query = urlunsplit(("", "", parts.path or "/", parts.query, ""))
    return _Target(url, scheme, host, port, path_and_query, ip is not None, addresses)


def check_callback_url(url: str, *, allow_private: bool, resolve: bool = True) -> str:
    """Checks that the service may call `url`.

    Args:
        url: The callback URL as submitted.
        allow_private: Accept addresses that are not global (a receiver inside your network).
        resolve: Resolve a host name and check every address it gives (this blocks: run it in a
            thread from async code). False checks only the URL itself and an IP-literal host.

    Returns:
        The URL, stripped of surrounding whitespace.

    Raises:
        CallbackURLError: The URL is refused; its `reason` says why.
    """
    return _check(url, allow_private=allow_private, resolve=resolve).url


def _signature(body: bytes, secret: str, timestamp: int) -> str:
    return hmac.new(secret.encode("utf-8"), f"{timestamp}.".encode("ascii") + body, hashlib.sha256).hexdigest()


def sign(body: bytes, secret: str, timestamp: int) -> str:
    """The signature header's value for `body` sent at `timestamp`.

    Args:
        body: The request body, exactly as sent.
        secret: The shared webhook secret.
        timestamp: Unix seconds.

    Returns:
        `"t=<timestamp>,v1=<hex HMAC-SHA256 of f"{timestamp}." + body>"`.
    """
    return f"t={int(timestamp)},v1={_signature(body, secret, int(timestamp))}"


def verify(body: bytes, header: str, secret: str, *, now: float, tolerance_s: float = 300) -> bool:
    """Checks a signature header as a receiver does.

    Args:
        body: The raw request body as received (before any JSON parsing).
        header: The `X-KlipNote-Signature` header's value.
        secret: The shared webhook secret.
        now: The receiver's current unix time.
        tolerance_s: Refuse signatures whose timestamp is further than this from `now`, either
            way (a replayed old delivery, or a clock far off).

    Returns:
        Whether the header is well formed, recent, and one of its `v1` values matches.
    """
    timestamps, signatures = [], []
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t":
            timestamps.append(value)
        elif key == "v1":
            signatures.append(value)
    if len(timestamps) != 1 or not timestamps[0].isascii() or not timestamps[0].isdigit() or not signatures:
        return False
    timestamp = int(timestamps[0])
    if abs(now - timestamp) > tolerance_s:
        return False
    expected = _signature(body, secret, timestamp).encode("ascii")
    # Several v1 values let a sender sign with an old and a new secret while they are rotated.
    return any(hmac.compare_digest(expected, s.encode("utf-8", "replace")) for s in signatures)


@dataclass
class WebhookSettings:
    """How deliveries are made.

    Attributes:
        secret: Key of the signature header; None sends deliveries unsigned.
        allow_private: Call addresses that are not global (see the module docstring).
        max_attempts: Attempts of one notification at most, the first included.
        backoff_s: The first retry comes this long after the first attempt; each next one waits twice as long.
        max_backoff_s: The longest wait between two attempts.
        timeout_s: The longest one attempt takes, from resolving the host to the receiver's status line.
    """

    secret: Optional[str]
    allow_private: bool = False
    max_attempts: int = 6
    backoff_s: float = 2.0
    max_backoff_s: float = 300.0
    timeout_s: float = 10.0

    def __post_init__(self):
        if self.secret is not None and not self.secret:
            # An empty key would sign with nothing anyone could not forge; None says "unsigned" explicitly.
            raise ValueError("The webhook secret must not be empty (None sends deliveries unsigned).")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1.")
        if self.backoff_s < 0 or self.max_backoff_s < 0 or self.timeout_s <= 0:
            raise ValueError("backoff_s and max_backoff_s must not be negative, timeout_s must be positive.")


@dataclass
class DeliveryResult:
    """The outcome of one delivery attempt.

    Attributes:
        delivered: The receiver answered 2xx.
        status_code: The receiver's HTTP status, None when there was no answer.
        error: Why the attempt failed, short and free of secrets or URLs ("HTTP 500", "timeout",
            "connection refused", "certificate verification failed", "refused: private_address");
            None when delivered.
        next_at: Unix time of the next attempt; None when delivered, out of attempts, or refused for good.
    """

    delivered: bool
    status_code: Optional[int]
    error: Optional[str]
    next_at: Optional[float]


def _next_attempt_at(settings: WebhookSettings, attempt: int, now: float) -> Optional[float]:
    if attempt >= settings.max_attempts:
        return None
    return now + min(settings.max_backoff_s, settings.backoff_s * 2 ** (attempt - 1))


def _transport_error(error: BaseException) -> str:
    """A short description of why a request got no answer."""
    import httpx

    if isinstance(error, (httpx.TimeoutException, TimeoutError)):
        return "timeout"
    # The OS's reason lies a few causes down (httpx wraps httpcore, which wraps anyio's "All
    # connection attempts failed", whose cause is the OSError or a group of them).
    seen, pending = set(), [error]
    while pending:
        e = pending.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
        if isinstance(e, ssl.SSLCertVerificationError):
            return "certificate verification failed"
        if isinstance(e, ssl.SSLError):
            return "TLS error"
        if isinstance(e, BaseExceptionGroup):
            pending.extend(e.exceptions)
        pending.extend((e.__cause__, e.__context__))
    if isinstance(error, httpx.ConnectError):
        return "connection failed"
    if isinstance(error, httpx.RemoteProtocolError):
        return "protocol error"
    return f"transport error ({type(error).__name__})"


def _netloc(address: IPAddress, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


async def deliver(
    url: str,
    payload: dict,
    *,
    event: str,
    delivery_id: str,
    settings: WebhookSettings,
    attempt: int,
    now: float,
    client: Optional["httpx.AsyncClient"] = None,
) -> DeliveryResult:
    """Makes one delivery attempt of a notification.

    The URL is checked again first, on the addresses its host resolves to now; a refused URL is
    refused for good (next_at None), while a host that does not resolve is retried like any
    other failure (DNS outages pass). The request goes to a checked address (the Host header and
    TLS server name stay the URL's host), so the HTTP client does not resolve the name again.

    Args:
        url: The job's callback URL.
        payload: The notification (`payload_for`).
        event: The `X-KlipNote-Event` header: "job.succeeded", "job.failed" or "job.cancelled".
        delivery_id: The `X-KlipNote-Delivery` header, `f"{job_id}:{status}"`: the same on every attempt.
        settings: Secret, retry and timeout settings.
        attempt: This attempt's number, counting from 1.
        now: The current unix time (`time.time()`): it stamps the signature and `next_at` counts from it.
        client: An httpx client to send with (the caller's proxies, say); None makes one for this attempt.

    Returns:
        The outcome; `next_at` says when to make attempt `attempt + 1`, if ever.
    """
    import httpx

    if attempt < 1:
        raise ValueError("attempt counts from 1.")
    next_at = _next_attempt_at(settings, attempt, now)

    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        EVENT_HEADER: event,
        DELIVERY_HEADER: delivery_id,
        # One connection per attempt: a pooled connection, opened (and its certificate checked)
        # for another host on the same address, must not carry this one's request.
        "Connection": "close",
    }
    if settings.secret is not None:
        headers[SIGNATURE_HEADER] = sign(body, settings.secret, int(now))

    own_client = client is None
    if own_client:
        # trust_env=False: proxies and certificate settings from the environment are the caller's
        # to choose (pass a client); a proxy would connect on its own terms, past the address check.
        client = httpx.AsyncClient(trust_env=False, follow_redirects=False)
    try:
        async with asyncio.timeout(settings.timeout_s):
            try:
                target = await asyncio.to_thread(_check, url, allow_private=settings.allow_private, resolve=True)
            except CallbackURLError as e:
                if e.reason == "unresolvable":
                    return DeliveryResult(False, None, "unresolvable", next_at)
                return DeliveryResult(False, None, f"refused: {e.reason}", None)
            extensions = {}
            if not target.literal:
                default_port = _DEFAULT_PORTS[target.scheme]
                headers["Host"] = target.host if target.port == default_port else f"{target.host}:{target.port}"
                extensions["sni_hostname"] = target.host.rstrip(".")
            error: BaseException = RuntimeError("no address")
            for address in target.addresses:
                request_url = urlunsplit((target.scheme, _netloc(address, target.port), target.path_and_query, "", ""))
                try:
                    # Streamed and never read: the status line is all a delivery needs, and a
                    # receiver must not be able to make the runner download anything.
                    async with client.stream(
                        "POST", request_url, content=body, headers=headers, extensions=extensions,
                        follow_redirects=False, timeout=settings.timeout_s,
                    ) as response:
                        status_code = response.status_code
                    break
                except httpx.ConnectError as e:
                    # Nothing was sent: the host's next address may be reachable (IPv6 without a route, say).
                    error = e
            else:
                return DeliveryResult(False, None, _transport_error(error), next_at)
    except httpx.InvalidURL:
        return DeliveryResult(False, None, "refused: host", None)
    except (httpx.TransportError, TimeoutError) as e:
        return DeliveryResult(False, None, _transport_error(e), next_at)
    finally:
        if own_client:
            await client.aclose()

    if 200 <= status_code < 300:
        return DeliveryResult(True, status_code, None, None)
    return DeliveryResult(False, status_code, f"HTTP {status_code}", next_at)


def payload_for(
    job_id: str,
    status: str,
    *,
    links: dict,
    created_at: float,
    finished_at: Optional[float],
    error: Optional[dict],
    model: Optional[str],
) -> dict:
    """The notification body of a finished job. It never holds the transcript: receivers fetch
    that from the job's links, with their API key.

    Args:
        job_id: The job's id.
        status: "succeeded", "failed" or "cancelled".
        links: The job's URLs by name (the job itself, its result).
        created_at: When the job was submitted (unix time).
        finished_at: When it ended (unix time), None if unknown.
        error: The job's error object (`{"code", "message"}`) when it failed.
        model: The model that served it, if known.

    Returns:
        `{"id", "object": "transcription.job", "status", "created_at", "finished_at", "model",
        "error", "links"}`, times in whole unix seconds (OpenAI's convention).
    """
    return {
        "id": job_id,
        "object": "transcription.job",
        "status": status,
        "created_at": int(created_at),
        "finished_at": None if finished_at is None else int(finished_at),
        "model": model,
        "error": error,
        "links": dict(links),
    }


__all__ = [
    "DELIVERY_HEADER",
    "EVENT_HEADER",
    "SIGNATURE_HEADER",
    "CallbackURLError",
    "DeliveryResult",
    "WebhookSettings",
    "check_callback_url",
    "deliver",
    "payload_for",
    "sign",
    "verify",
]
