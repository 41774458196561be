"""OAuth Client ID Metadata Document (draft-ietf-oauth-client-id-metadata-document-02, "CIMD").

A client may use an https URL as its ``client_id``; the broker fetches the JSON document at that URL
and uses it as the client's registration. Section numbers below are those of draft -02.

- Section 3: a Client Identifier URL MUST use https, MUST NOT contain userinfo, MUST contain a path,
  MUST NOT contain dot segments or a fragment, SHOULD NOT contain a query; it is compared by simple
  string comparison. The broker refuses a query as well (one host could otherwise mint any number of
  client identities, ``https://host/cimd?name=Anything``, all shown as the same host on the consent
  page) and a root path (the MCP SDK refuses it too).
- Section 4: the document is a JSON object whose ``client_id`` equals the URL (simple string
  comparison); section 4.1: no shared-secret ``token_endpoint_auth_method``, no ``client_secret`` or
  ``client_secret_expires_at``, no private key material. The broker supports only public clients
  here (``none``); ``private_key_jwt`` is refused until it is implemented.
- Section 5: 200 only, redirects are never followed; section 5.1: a failed fetch aborts the
  authorization request; section 5.2: cached per HTTP cache headers within bounds, errors and
  invalid documents never cached as a client. A failed fetch or an invalid document is
  remembered for ``failure_cache`` seconds in ``client_metadata_failures`` (its reason only, never
  its content), so that a flood of authorization requests naming a broken or hostile document
  does not make the broker fetch it again and again.
- Section 8.6 (SSRF): the host is resolved once, every special-use address (RFC 6890 and the IANA
  special-purpose registries) is refused, and the connection goes to the address that was checked,
  with TLS verified for the host name. Section 8.7: at most ``max_bytes`` are read. Fetches are
  limited per host (``rate_limits.client_metadata_fetch.per_host``), so the broker cannot be made
  to hammer one host with documents at ever new paths; ``allowed_hosts`` (only these, when set) and
  ``denied_hosts`` say whose documents may be fetched at all (``*.example.com``: its subdomains).
- Section 8.6 also warns that error messages can reveal the internal network: the reason and the
  detail of a :class:`CIMDError` are for the log and the audit trail; a page says only that the
  client could not be verified.

A failed refetch of a document that was valid before refuses the authorization request (the host
stopped serving it) but keeps the ``clients`` row: grants already issued keep working at the token
endpoint, where the row's ``expires_at`` means "refetch at the next /authorize", never "invalid".
"""

from __future__ import annotations

import datetime as dt
import email.utils
import ipaddress
import json
import logging
import re
import socket
import ssl
import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeGuard
from urllib.parse import urlsplit

import certifi
import httpcore
import httpx
from authlib.oauth2 import OAuth2Error
from authlib.oauth2.rfc7591.errors import InvalidRedirectURIError
from sqlalchemy import delete
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .. import audit, metrics
from ..config import CIMDSettings, Settings
from ..db import Database, utcnow
from ..models import Client, ClientMetadataFailure
from ..ratelimit import RateLimiter
from .clients import is_loopback_redirect
from .rfc7591 import normalize_client_metadata

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_URL_LENGTH = 2048
MAX_CLIENT_NAME = 200
USER_AGENT = "mcp-identity-broker (client metadata document fetcher)"

# Why a client identifier URL or its document was refused: short fixed codes, safe to show, log
# and audit (never the attacker-supplied text itself).
REASONS = frozenset(
    {
        "disabled",  # client_metadata_documents.enabled is false
        "not_https",  # section 3: https only
        "invalid_client_id_url",  # section 3: the other URL rules
        "resolve_failed",  # the host name does not resolve
        "forbidden_address",  # section 8.6: a special-use address
        "timeout",  # the whole fetch took longer than `timeout`
        "fetch_failed",  # connection, TLS or HTTP protocol failure
        "bad_status",  # section 5: anything but 200 (redirects included)
        "too_large",  # section 8.7: more than `max_bytes`
        "bad_encoding",  # a Content-Encoding: only the identity encoding is read
        "not_json",  # not a JSON media type, or not valid JSON
        "invalid_document",  # section 4: not a JSON object
        "client_id_mismatch",  # section 4: client_id differs from the URL
        "invalid_client_name",  # client_name missing, not a string, or too long
        "invalid_redirect_uri",  # redirect_uris missing or invalid (RFC 7591 rules)
        "secret_present",  # section 4.1: client_secret or private key material
        "unsupported_auth_method",  # section 4.1, and only public clients (none) for now
        "invalid_metadata",  # another RFC 7591 field the broker cannot use
        "host_not_allowed",  # allowed_hosts is set and does not name the host
        "host_denied",  # denied_hosts names the host
        "rate_limited",  # too many fetches from the host (rate_limits.client_metadata_fetch)
    }
)
# Refusals about the document or its fetch, remembered for failure_cache seconds; the others
# (configuration, the URL itself, the fetch limit) cost nothing to decide again.
CACHED_REASONS = REASONS - {
    "disabled",
    "not_https",
    "invalid_client_id_url",
    "host_not_allowed",
    "host_denied",
    "rate_limited",
}


class CIMDError(Exception):
    """A client identifier URL, its fetch or its document was refused. ``reason`` (one of
    :data:`REASONS`) and ``detail`` (never the document's content) are for the log and the audit
    trail only: a page that named them would let anyone probe internal names and ports through
    the broker (section 8.6). ``retry_after``: seconds until a fetch may be tried again, when the
    refusal is the per-host limit."""

    def __init__(self, reason: str, detail: str = "", *, retry_after: int | None = None) -> None:
        assert reason in REASONS, reason
        super().__init__(reason)
        self.reason = reason
        self.detail = detail or reason
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail != self.reason else self.reason


# -- Section 3: the Client Identifier URL ----------------------------------------------------

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$", re.IGNORECASE)
_NUMERIC_LABEL = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$", re.IGNORECASE)
_PORT = re.compile(r"^[1-9][0-9]{0,4}$")
_PERCENT = re.compile(r"%(?![0-9a-fA-F]{2})")


def client_id_url_problem(client_id: object) -> str | None:
    """Why ``client_id`` is not a usable Client Identifier URL (section 3), or None."""
    if not isinstance(client_id, str) or not client_id:
        return "not a string"
    if len(client_id) > MAX_URL_LENGTH:
        return "longer than 2048 characters"
    if not client_id.startswith("https://"):
        return "not an https URL"
    if any(not 0x21 <= ord(c) <= 0x7E for c in client_id) or "\\" in client_id:
        return "characters outside printable ASCII, or a backslash"
    if "#" in client_id:
        return "a fragment"
    if "?" in client_id:
        return "a query"
    authority, slash, path = client_id[len("https://") :].partition("/")
    if "@" in authority:
        return "userinfo"
    if _PERCENT.search(client_id) or "%" in authority:
        return "bad percent-encoding"
    if authority.startswith("["):
        literal, bracket, port_part = authority[1:].partition("]")
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            return "a bad IPv6 literal"
        if not bracket or (port_part and not port_part.startswith(":")):
            return "a bad IPv6 literal"
        port = port_part[1:] if port_part else None
    else:
        host, colon, port_text = authority.partition(":")
        port = port_text if colon else None
        if not _HOSTNAME.match(host):
            return "a bad host name"
        if _NUMERIC_LABEL.match(host.rsplit(".", 1)[-1]):
            # Only canonical dotted quads: "127.1" or "0x7f.1" mean different things to
            # different URL parsers.
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                return "a host name that is neither a name nor a dotted-quad IPv4 address"
    if port is not None and (not _PORT.match(port) or int(port) > 65535):
        return "a bad port"
    if not slash or not path:
        return "no path (or the root path)"
    for segment in ("/" + path).split("/"):
        if segment.lower().replace("%2e", ".") in (".", ".."):
            return "a dot segment"
    try:
        urlsplit(client_id).port  # noqa: B018 - the same parse the fetcher uses must succeed
    except ValueError:
        return "a bad port"
    return None


def is_client_id_url(client_id: object) -> TypeGuard[str]:
    """Whether ``client_id`` is a Client Identifier URL the broker fetches (section 3): https, a
    host, a non-root path, no userinfo, query, fragment or dot segment, at most 2048 characters.
    DCR client ids (``mcp_...``) never start with ``https://`` (section 7.1)."""
    return client_id_url_problem(client_id) is None


# -- Section 8.6: special-use addresses ------------------------------------------------------


def _networks(*cidrs: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


# The IANA IPv4 Special-Purpose Address Registry (RFC 6890 and its updates), all of it.
SPECIAL_IPV4 = _networks(
    "0.0.0.0/8",  # "this network"
    "10.0.0.0/8",  # private
    "100.64.0.0/10",  # shared address space (CGNAT)
    "127.0.0.0/8",  # loopback
    "169.254.0.0/16",  # link-local (cloud metadata services)
    "172.16.0.0/12",  # private
    "192.0.0.0/24",  # IETF protocol assignments
    "192.0.2.0/24",  # documentation
    "192.31.196.0/24",  # AS112
    "192.52.193.0/24",  # AMT
    "192.88.99.0/24",  # 6to4 relay anycast (deprecated)
    "192.168.0.0/16",  # private
    "192.175.48.0/24",  # direct delegation AS112
    "198.18.0.0/15",  # benchmarking
    "198.51.100.0/24",  # documentation
    "203.0.113.0/24",  # documentation
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, and the limited broadcast address
)
# The IANA IPv6 Special-Purpose Address Registry, plus multicast, site-local and everything
# outside global unicast (2000::/3). 64:ff9b::/96 (NAT64) and 2002::/16 (6to4) are decided by
# what they embed or refused outright, below.
SPECIAL_IPV6 = _networks(
    "::/96",  # unspecified, loopback and the deprecated IPv4-compatible forms
    "::ffff:0:0/96",  # IPv4-mapped
    "64:ff9b:1::/48",  # local-use NAT64
    "100::/64",  # discard-only
    "100:0:0:1::/64",  # dummy prefix
    "2001::/23",  # IETF protocol assignments: Teredo, benchmarking, ORCHID, ...
    "2001:db8::/32",  # documentation
    "2002::/16",  # 6to4 (deprecated; it can embed any IPv4 address)
    "2620:4f:8000::/48",  # AS112
    "3fff::/20",  # documentation
    "5f00::/16",  # SRv6 SIDs
    "fc00::/7",  # unique local
    "fe80::/10",  # link-local
    "fec0::/10",  # site-local (deprecated)
    "ff00::/8",  # multicast
)
GLOBAL_UNICAST_V6 = ipaddress.IPv6Network("2000::/3")
NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")


def is_forbidden_address(address: IPAddress) -> bool:
    """Whether fetching from ``address`` is refused (section 8.6: special-use addresses, RFC
    6890). IPv4-mapped and IPv4-compatible IPv6 forms, 6to4 and Teredo are refused outright; an
    address in the well-known NAT64 prefix 64:ff9b::/96 (RFC 6052, an IPv6-only network reaching
    the IPv4 internet) is judged by the IPv4 address it embeds."""
    if isinstance(address, ipaddress.IPv4Address):
        return (
            any(address in net for net in SPECIAL_IPV4)
            or not address.is_global
            or address.is_multicast
            or address.is_reserved
        )
    if address.scope_id:
        return True
    if address in NAT64_WELL_KNOWN:
        return is_forbidden_address(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    if (
        address.ipv4_mapped is not None
        or address.sixtofour is not None
        or address.teredo is not None
    ):
        return True
    return (
        address not in GLOBAL_UNICAST_V6
        or any(address in net for net in SPECIAL_IPV6)
        or not address.is_global
        or address.is_multicast
        or address.is_reserved
        or address.is_site_local
    )


# -- Section 5.2: caching --------------------------------------------------------------------


def cache_lifetime(
    headers: Mapping[str, str], *, minimum: int, maximum: int, now: dt.datetime | None = None
) -> int:
    """How long to keep a document, in seconds, from its response headers (RFC 9111 section
    4.2.1), clamped to [minimum, maximum]. ``no-store`` and ``no-cache`` mean the minimum;
    ``max-age`` wins over ``Expires`` (taken relative to ``Date``); ``Age`` is subtracted; no
    information at all means the minimum."""
    lower = {k.lower(): v for k, v in headers.items()}
    lifetime: int | None = None
    directives: dict[str, str] = {}
    for part in lower.get("cache-control", "").split(","):
        name, _, value = part.partition("=")
        if name.strip():
            directives.setdefault(name.strip().lower(), value.strip().strip('"'))
    if "no-store" in directives or "no-cache" in directives:
        return minimum
    if "max-age" in directives:
        value = directives["max-age"]
        lifetime = int(value) if value.isdigit() else 0  # invalid: already stale
    elif "expires" in lower:
        expires = _http_date(lower["expires"])
        base = _http_date(lower.get("date", "")) or now or utcnow()
        lifetime = int((expires - base).total_seconds()) if expires else 0
    if lifetime is None:
        return minimum
    age = lower.get("age", "").strip()
    if age.isdigit():
        lifetime -= int(age)
    return max(minimum, min(maximum, lifetime))


def _http_date(value: str) -> dt.datetime | None:
    try:
        parsed = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed


# -- Section 4: the document -----------------------------------------------------------------

PRIVATE_JWK_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}
HTTPS_ONLY_FIELDS = ("client_uri", "logo_uri", "tos_uri", "policy_uri")


def validate_document(client_id: str, document: object) -> dict[str, Any]:
    """The document, validated (sections 4 and 4.1) and reduced to what the broker supports; the
    RFC 7591 rules for redirect URIs, grant and response types apply. Unknown fields are
    ignored. Raises :class:`CIMDError`."""
    if not isinstance(document, dict):
        raise CIMDError("invalid_document", "the document is not a JSON object")
    if document.get("client_id") != client_id:
        raise CIMDError("client_id_mismatch", "client_id does not equal the document's URL")
    if "client_secret" in document or "client_secret_expires_at" in document:
        raise CIMDError("secret_present", "the document contains client_secret")
    jwks = document.get("jwks")
    keys = jwks.get("keys") if isinstance(jwks, dict) else None
    if isinstance(keys, list) and any(
        isinstance(k, dict) and PRIVATE_JWK_MEMBERS & set(k) for k in keys
    ):
        raise CIMDError("secret_present", "the document's jwks holds private key material")
    method = document.get("token_endpoint_auth_method", "none")
    if method != "none":
        raise CIMDError(
            "unsupported_auth_method",
            f"token_endpoint_auth_method {str(method)[:40]!r} (only none is supported)",
        )
    name = document.get("client_name")
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_CLIENT_NAME:
        raise CIMDError("invalid_client_name", "client_name must be a string of 1 to 200 chars")
    data = dict(document)
    for key in HTTPS_ONLY_FIELDS:  # section 8.6: only URLs with a known, safe scheme are kept
        if key in data and not (isinstance(data[key], str) and data[key].startswith("https://")):
            del data[key]
    if "application_type" not in data:
        uris = data.get("redirect_uris")
        native = isinstance(uris, list) and any(
            isinstance(u, str)
            and (is_loopback_redirect(u) or not u.lower().startswith(("https:", "http:")))
            for u in uris
        )
        data["application_type"] = "native" if native else "web"
    try:
        metadata = normalize_client_metadata(data)
    except InvalidRedirectURIError as exc:
        raise CIMDError("invalid_redirect_uri", str(exc.description)) from None
    except OAuth2Error as exc:
        raise CIMDError("invalid_metadata", str(exc.description)) from None
    metadata["client_id"] = client_id
    metadata["client_name"] = name.strip()
    return metadata


# -- Section 5 and 8.6: the fetch ------------------------------------------------------------


@dataclass(frozen=True)
class FetchedDocument:
    """A 200 response's parsed JSON body and how long it may be cached (seconds)."""

    document: object
    lifetime: int


_resolver = ThreadPoolExecutor(max_workers=4, thread_name_prefix="cimd-resolve")


def resolve(host: str, port: int, timeout: float) -> list[IPAddress]:
    """Every address ``host`` resolves to, in resolver order (a literal is its own address).
    The lookup runs in a worker thread so that it counts against the fetch's total timeout."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    future = _resolver.submit(
        socket.getaddrinfo, host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    try:
        infos = future.result(timeout=max(timeout, 0.001))
    except TimeoutError:
        future.cancel()
        raise CIMDError("timeout", f"resolving {host} timed out") from None
    except (OSError, UnicodeError) as exc:
        raise CIMDError("resolve_failed", f"resolving {host}: {exc}") from None
    addresses: list[IPAddress] = []
    for family, _, _, _, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        address = ipaddress.ip_address(str(sockaddr[0]))
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise CIMDError("resolve_failed", f"{host} has no address")
    return addresses


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def cap(self, timeout: float | None, error: type[httpcore.TimeoutException]) -> float:
        remaining = self.remaining()
        if remaining <= 0:
            raise error("the total timeout of the fetch expired")
        return remaining if timeout is None else min(timeout, remaining)


class _DeadlineStream(httpcore.NetworkStream):
    """A network stream whose every operation ends by the fetch's overall deadline, so that a
    server dripping bytes cannot stretch the fetch beyond ``timeout`` in total."""

    def __init__(self, inner: httpcore.NetworkStream, deadline: Deadline) -> None:
        self._inner = inner
        self._deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._deadline.cap(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._deadline.cap(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._inner.start_tls(
            ssl_context, server_hostname, self._deadline.cap(timeout, httpcore.ConnectTimeout)
        )
        return _DeadlineStream(stream, self._deadline)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _PinnedBackend(httpcore.NetworkBackend):
    """Connects to the already checked addresses, never to a fresh resolution of the host name
    (no DNS rebinding between the check and the connection). TLS still uses the host name: httpcore
    sends it as SNI and the SSL context verifies the certificate against it."""

    def __init__(self, addresses: list[IPAddress], deadline: Deadline) -> None:
        self._addresses = addresses
        self._deadline = deadline
        self._tcp = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        error: Exception = httpcore.ConnectError(f"no address for {host}")
        for address in self._addresses:
            try:
                stream = self._tcp.connect_tcp(
                    str(address),
                    port,
                    self._deadline.cap(timeout, httpcore.ConnectTimeout),
                    local_address,
                    socket_options,
                )
            except httpcore.ConnectError as exc:  # try the next checked address
                error = exc
                continue
            return _DeadlineStream(stream, self._deadline)
        raise error

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are never used")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class _ResponseBody(httpx.SyncByteStream):
    def __init__(self, response: httpcore.Response) -> None:
        self._response = response

    def __iter__(self) -> Iterator[bytes]:
        stream = self._response.stream
        assert isinstance(stream, Iterable)
        yield from stream

    def close(self) -> None:
        self._response.close()


class PinnedTransport(httpx.BaseTransport):
    """An httpx transport for one fetch: HTTP/1.1 over TLS to the checked addresses, no proxy,
    no retries, every operation bounded by the overall deadline."""

    def __init__(
        self, ssl_context: ssl.SSLContext, addresses: list[IPAddress], deadline: Deadline
    ) -> None:
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context,
            max_connections=1,
            http1=True,
            http2=False,
            retries=0,
            network_backend=_PinnedBackend(addresses, deadline),
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.SyncByteStream)
        response = self._pool.handle_request(
            httpcore.Request(
                method=request.method,
                url=httpcore.URL(
                    scheme=request.url.raw_scheme,
                    host=request.url.raw_host,
                    port=request.url.port,
                    target=request.url.raw_path,
                ),
                headers=request.headers.raw,
                content=request.stream,
                extensions=request.extensions,
            )
        )
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_ResponseBody(response),
            extensions=response.extensions,
        )

    def close(self) -> None:
        self._pool.close()


def _is_plain_loopback(address: IPAddress) -> bool:
    """127.0.0.0/8 or ::1, never an IPv4-mapped or -compatible spelling of them."""
    if isinstance(address, ipaddress.IPv4Address):
        return address.is_loopback
    return address == ipaddress.IPv6Address("::1")


_JSON_MEDIA_TYPE = re.compile(r"^application/(?:[a-z0-9.!#$&^_-]+\+)?json$")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:  # parsers disagree about duplicates: refuse the ambiguity
            raise ValueError("duplicate member")
        result[key] = value
    return result


class DocumentFetcher:
    """Fetches Client ID Metadata Documents safely (sections 5, 8.6 and 8.7).

    Test-only allowance: when ``testing`` is true (config parsing accepts ``allow_hosts`` and
    ``ca_file`` only then), a host listed in ``allow_hosts`` may resolve to a loopback address and
    its certificate is verified against ``ca_file``. Nothing else is ever relaxed, and outside
    tests both settings are ignored even if set.
    """

    def __init__(self, settings: CIMDSettings, *, testing: bool = False) -> None:
        self.settings = settings
        self._context = ssl.create_default_context(cafile=certifi.where())
        self._allow_hosts = frozenset(h.lower() for h in settings.allow_hosts) if testing else ()
        self._test_context = (
            ssl.create_default_context(cafile=settings.ca_file)
            if testing and settings.ca_file
            else None
        )

    def fetch(self, url: str) -> FetchedDocument:
        """GET ``url``: every address the host resolves to must pass the special-use filter;
        200 only, no redirects, a JSON media type, at most ``max_bytes``, all within ``timeout``
        seconds (name resolution included). Raises :class:`CIMDError`."""
        if not isinstance(url, str) or not url.startswith("https://"):
            raise CIMDError("not_https", "not an https URL")
        problem = client_id_url_problem(url)
        if problem:
            raise CIMDError("invalid_client_id_url", f"the URL has {problem}")
        settings = self.settings
        deadline = Deadline(settings.timeout)
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        port = parts.port or 443
        addresses = resolve(host, port, deadline.remaining())
        allowed = host in self._allow_hosts
        for address in addresses:
            if is_forbidden_address(address) and not (allowed and _is_plain_loopback(address)):
                raise CIMDError("forbidden_address", f"{host} resolves to {address}")
        context = self._test_context if allowed and self._test_context else self._context
        try:
            return self._get(url, PinnedTransport(context, addresses, deadline))
        except (httpx.TimeoutException, httpcore.TimeoutException):
            raise CIMDError("timeout", f"fetching from {host} timed out") from None
        except (httpcore.ProtocolError, httpx.ProtocolError) as exc:
            # The message may quote what the server sent: the class name only.
            raise CIMDError("fetch_failed", f"{host}: {type(exc).__name__}") from None
        except (
            httpx.HTTPError,
            httpcore.NetworkError,
            httpcore.UnsupportedProtocol,
            OSError,
        ) as exc:  # connection and TLS failures, described by the OS and the TLS library
            raise CIMDError("fetch_failed", f"{host}: {type(exc).__name__}: {exc}"[:300]) from None

    def _get(self, url: str, transport: PinnedTransport) -> FetchedDocument:
        settings = self.settings
        limit = settings.max_bytes
        with (
            httpx.Client(
                transport=transport,
                follow_redirects=False,
                trust_env=False,
                timeout=httpx.Timeout(settings.timeout),
            ) as http,
            http.stream(
                "GET",
                url,
                headers={
                    "Accept": "application/json",
                    "Accept-Encoding": "identity",
                    "User-Agent": USER_AGENT,
                },
            ) as response,
        ):
            status = response.status_code
            if status != 200:
                redirect = " (redirects are never followed)" if 300 <= status < 400 else ""
                raise CIMDError("bad_status", f"status {status}{redirect}")
            media_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
            if not _JSON_MEDIA_TYPE.match(media_type):
                raise CIMDError("not_json", f"content type {media_type[:60]!r}")
            if response.headers.get("content-encoding", "identity").strip().lower() != "identity":
                raise CIMDError("bad_encoding", "a Content-Encoding other than identity")
            length = response.headers.get("content-length", "")
            if length.strip().isdigit() and int(length) > limit:
                raise CIMDError("too_large", f"Content-Length {int(length)} > {limit}")
            body = bytearray()
            for chunk in response.iter_raw():
                body += chunk
                if len(body) > limit:
                    raise CIMDError("too_large", f"more than {limit} bytes")
            headers = response.headers
        try:
            document = json.loads(bytes(body).decode("utf-8"), object_pairs_hook=_reject_duplicates)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise CIMDError("not_json", "the body is not valid JSON") from None
        lifetime = cache_lifetime(headers, minimum=settings.cache_min, maximum=settings.cache_max)
        return FetchedDocument(document, lifetime)


# -- The service the /authorize view calls --------------------------------------------------


def host_matches(host: str, patterns: Iterable[str]) -> bool:
    """Whether ``host`` is one of ``patterns``: a host name, or ``*.example.com`` for every
    subdomain of example.com (not example.com itself). Compared case-insensitively, without a
    trailing dot."""
    host = host.lower().rstrip(".")
    for pattern in patterns:
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
                return True
        elif host == pattern:
            return True
    return False


class ClientMetadataDocuments:
    """Clients identified by their metadata document: fetched at /authorize, kept as ``clients``
    rows of kind ``cimd`` whose ``expires_at`` says when to fetch again."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        fetcher: DocumentFetcher | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.fetcher = fetcher or DocumentFetcher(
            settings.client_metadata_documents, testing=settings.testing
        )
        self.limiter = limiter or RateLimiter.for_settings(settings, db)

    @property
    def enabled(self) -> bool:
        return self.settings.client_metadata_documents.enabled

    def ensure_fresh(self, client_id: str, address: str | None = None) -> None:
        """Make sure a fresh, validated row exists for ``client_id`` (a Client Identifier URL):
        refetch when the cached document expired. Call it outside any database transaction:
        the fetch never holds a database lock. Raises :class:`CIMDError` (section 5.1: the
        authorization request is then aborted).

        In order: an operator's client of that id is never fetched; the host must pass
        ``allowed_hosts`` and ``denied_hosts`` (also for a document still cached, so that a
        host the operator denies is refused at once); a fresh document is used; a failure
        remembered less than ``failure_cache`` seconds ago is answered again without a fetch;
        the per-host fetch limit; then the fetch."""
        now = utcnow()
        with self.db.read() as session:
            row = session.get(Client, client_id)
            kind = row.kind if row else None
            expires_at = row.expires_at if row else None
            failure = session.get(ClientMetadataFailure, client_id)
            cached = (failure.reason, failure.retry_at) if failure is not None else None
        if kind is not None and kind != "cimd":
            return  # an operator registered this URL as a client (section 7.2): no fetch
        if not self.enabled:
            raise CIMDError("disabled", "client metadata documents are disabled")
        host = (urlsplit(client_id).hostname or "").lower()
        self._check_host(host)
        if kind == "cimd" and expires_at is not None and expires_at > now:
            return
        if cached is not None and cached[1] > now and cached[0] in REASONS:
            reason, retry_at = cached
            raise CIMDError(
                reason, f"{reason} remembered: not fetched again before {retry_at:%X} UTC"
            )
        self._check_fetch_limit(host)
        try:
            fetched = self.fetcher.fetch(client_id)
            metadata = validate_document(client_id, fetched.document)
        except CIMDError as exc:
            metrics.client_metadata_fetch(exc.reason)
            self._refused(client_id, exc, address, known=kind is not None)
            raise
        self._store(client_id, metadata, fetched.lifetime, address)
        metrics.client_metadata_fetch("success")

    def _check_host(self, host: str) -> None:
        settings = self.settings.client_metadata_documents
        if settings.allowed_hosts and not host_matches(host, settings.allowed_hosts):
            raise CIMDError("host_not_allowed", f"{host} is not in allowed_hosts")
        if host_matches(host, settings.denied_hosts):
            raise CIMDError("host_denied", f"{host} is in denied_hosts")

    def _check_fetch_limit(self, host: str) -> None:
        rate = self.limiter.limit("client_metadata_fetch", "per_host")
        if rate is None:
            return
        verdict = self.limiter.hit("client_metadata_fetch", "per_host", host, rate)
        if verdict.allowed:
            return
        if verdict.count == rate.count + 1:  # once per window, not once per refused request
            log.warning("client metadata documents: more than %s fetches from %s", rate, host)
        raise CIMDError(
            "rate_limited",
            f"more than {rate} fetches from {host}",
            retry_after=verdict.retry_after,
        )

    def _refused(self, client_id: str, exc: CIMDError, address: str | None, known: bool) -> None:
        # Never cached as a client (section 5.2): nothing changes on the row. A known client keeps
        # its row so that its grants keep working at the token endpoint. The failure itself is
        # remembered briefly, so that a flood does not refetch it.
        level = logging.WARNING if known else logging.INFO
        log.log(level, "client metadata document refused (%s): %s", exc.reason, exc.detail)
        seconds = self.settings.client_metadata_documents.failure_cache
        with self.db.session() as session:
            if exc.reason in CACHED_REASONS and seconds > 0:
                now = utcnow()
                insert = sqlite.insert if self.db.is_sqlite else postgresql.insert
                values = {
                    "reason": exc.reason,
                    "failed_at": now,
                    "retry_at": now + dt.timedelta(seconds=seconds),
                }
                session.execute(
                    insert(ClientMetadataFailure)
                    .values(client_id=client_id, **values)
                    .on_conflict_do_update(index_elements=["client_id"], set_=values)
                )
            audit.record(
                session,
                "register",
                "failure",
                client_id=client_id[:MAX_URL_LENGTH],
                reason=exc.reason,
                address=address,
                details={"kind": "cimd", "known": known},
            )

    def _store(
        self, client_id: str, metadata: dict[str, Any], lifetime: int, address: str | None
    ) -> None:
        """Insert or update the row in its own short transaction. Two workers fetching the same
        new document both try to insert: the loser re-reads and updates."""
        for attempt in range(2):
            try:
                with self.db.session() as session:
                    self._upsert(session, client_id, metadata, lifetime, address)
                return
            except IntegrityError:
                if attempt:
                    raise
                log.info("client metadata document stored concurrently; updating instead")

    def _upsert(
        self,
        session: Session,
        client_id: str,
        metadata: dict[str, Any],
        lifetime: int,
        address: str | None,
    ) -> None:
        now = utcnow()
        session.execute(
            delete(ClientMetadataFailure).where(ClientMetadataFailure.client_id == client_id)
        )
        row = session.get(Client, client_id)
        event: str | None = None
        if row is None:
            row = Client(client_id=client_id, kind="cimd", created_at=now)
            session.add(row)
            event = "created"
        elif row.kind != "cimd":
            return  # registered by the operator meanwhile
        elif row.client_metadata != metadata:
            event = "updated"  # new redirect URIs change the consent digest: asked again
        row.name = metadata["client_name"]
        row.redirect_uris = metadata["redirect_uris"]
        row.grant_types = metadata["grant_types"]
        row.response_types = ["code"]
        row.token_endpoint_auth_method = "none"
        row.application_type = metadata["application_type"]
        row.scope = metadata.get("scope")
        row.secret_hash = None
        row.client_metadata = metadata
        row.expires_at = now + dt.timedelta(seconds=lifetime)
        session.flush()
        if event is not None:
            log.info("client metadata document %s: %s", event, client_id)
            audit.record(
                session,
                "register",
                "success",
                client_id=client_id,
                address=address,
                reason=event,
                details={
                    "kind": "cimd",
                    "client_name": row.name,
                    "redirect_uris": row.redirect_uris,
                },
            )
