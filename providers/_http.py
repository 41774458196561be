"""The back channel to an upstream: one request, its failures mapped to the provider errors.

Every failure names what was asked, the method and URL (without query) and the cause; the
broker's log line adds the provider, so it is one an operator can act on. Network failures,
5xx and 429 are temporary (:class:`UpstreamUnavailable`: the MCP client gets
``temporarily_unavailable``); everything else the caller judges. Upstream response text is
never put into an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit, urlunsplit

import httpx

from ._config import sanitize_code
from .errors import LoginFailed, UpstreamUnavailable

__all__ = ["MAX_RESPONSE_BYTES", "UpstreamAPI", "UpstreamHTTP", "bare_url", "log_host", "origin"]

MAX_RESPONSE_BYTES = 1 << 20
"""Largest upstream answer read (an identity, a token response, a discovery document)."""


def bare_url(url: str) -> str:
    """``url`` without query and fragment, for log lines (queries may carry codes)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(invalid URL)"
    return urlunsplit(parts._replace(query="", fragment=""))


def origin(url: str) -> str:
    """The origin of ``url`` (RFC 6454: scheme, host and port), lower-cased, to compare where
    an upstream answer points with where the broker may send a token."""
    parts = urlsplit(url)
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}"


def log_host(url: str) -> str:
    """The host (and port) of ``url`` in log-safe characters."""
    parts = urlsplit(url)
    return sanitize_code(parts.hostname) + (f":{parts.port}" if parts.port else "")


class UpstreamHTTP:
    """Back-channel requests of one configured provider."""

    def __init__(self, provider: str, *, timeout: float) -> None:
        self.provider = provider
        self.timeout = timeout

    def where(self, what: str, method: str, url: str) -> str:
        return f"{what} {method} {bare_url(url)}"

    def api(
        self,
        base_url: str,
        *,
        headers: Mapping[str, str] | None = None,
        page_params: Mapping[str, str] | None = None,
    ) -> UpstreamAPI:
        """The upstream's JSON API under ``base_url`` (see :class:`UpstreamAPI`)."""
        return UpstreamAPI(self, base_url, headers=headers, page_params=page_params)

    def send(
        self,
        http: httpx.Client,
        method: str,
        url: str,
        *,
        what: str,
        headers: Mapping[str, str] | None = None,
        data: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """One request; raises :class:`UpstreamUnavailable` for network failures, 5xx and 429."""
        try:
            response = http.request(
                method,
                url,
                headers=headers,
                data=data,
                params=params,
                timeout=self.timeout,
                follow_redirects=False,
                extensions={"provider": self.provider},  # the broker times requests by it
            )
        except httpx.TimeoutException as exc:
            raise UpstreamUnavailable(
                f"{self.where(what, method, url)}: timed out after {self.timeout:g}s "
                f"({type(exc).__name__})"
            ) from exc
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable(
                f"{self.where(what, method, url)}: {type(exc).__name__}: {exc}"
            ) from exc
        if response.status_code >= 500 or response.status_code == 429:
            raise UpstreamUnavailable(
                f"{self.where(what, method, url)}: answered HTTP {response.status_code}"
            )
        return response

    def json(self, response: httpx.Response, *, what: str, reason: str) -> Any:
        """The JSON body of ``response``; :class:`LoginFailed` with ``reason`` when it is too
        large or not JSON."""
        where = self.where(what, response.request.method, str(response.request.url))
        if len(response.content) > MAX_RESPONSE_BYTES:
            raise LoginFailed(reason, detail=f"{where}: response larger than {MAX_RESPONSE_BYTES}")
        try:
            return response.json()
        except ValueError:
            raise LoginFailed(
                reason, detail=f"{where}: HTTP {response.status_code}, not JSON"
            ) from None

    def json_object(self, response: httpx.Response, *, what: str, reason: str) -> dict[str, Any]:
        body = self.json(response, what=what, reason=reason)
        if not isinstance(body, dict):
            where = self.where(what, response.request.method, str(response.request.url))
            raise LoginFailed(reason, detail=f"{where}: not a JSON object")
        return body

    def get_json(
        self,
        http: httpx.Client,
        url: str,
        *,
        what: str,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        ok: tuple[int, ...] = (200,),
    ) -> httpx.Response:
        """GET ``url`` asking for JSON (with a bearer ``token`` when given); a status not in
        ``ok`` is :class:`LoginFailed` ``<what>_failed``. Returns the response (see
        :meth:`json`)."""
        sent = {"Accept": "application/json", **(headers or {})}
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        response = self.send(http, "GET", url, what=what, headers=sent, params=params)
        if response.status_code not in ok:
            raise LoginFailed(
                f"{what}_failed",
                detail=f"{self.where(what, 'GET', url)}: answered HTTP {response.status_code}",
            )
        return response

    def get_list(
        self,
        http: httpx.Client,
        url: str,
        *,
        what: str,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        """:meth:`get_json` for an answer that must be a JSON list of objects (one page);
        anything else is :class:`LoginFailed` ``<what>_invalid``."""
        response = self.get_json(http, url, what=what, token=token, headers=headers)
        return self._objects(response, what=what, where=self.where(what, "GET", url))

    def get_pages(
        self,
        http: httpx.Client,
        url: str,
        *,
        what: str,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
        max_pages: int = 10,
    ) -> list[dict[str, Any]]:
        """Every object of a paginated JSON list, following ``Link: <...>; rel="next"``
        (RFC 8288) on the same scheme and host only, for at most ``max_pages`` pages."""
        items: list[dict[str, Any]] = []
        where = self.where(what, "GET", url)
        first = urlsplit(url)[:2]
        for _ in range(max_pages):
            response = self.get_json(http, url, what=what, token=token, headers=headers)
            items.extend(self._objects(response, what=what, where=where))
            next_url = response.links.get("next", {}).get("url")
            if not next_url:
                return items
            url = urljoin(str(response.url), next_url)
            if urlsplit(url)[:2] != first:
                raise LoginFailed(f"{what}_invalid", detail=f"{where}: next page on another host")
        raise LoginFailed(f"{what}_invalid", detail=f"{where}: more than {max_pages} pages")

    def _objects(self, response: httpx.Response, *, what: str, where: str) -> list[dict[str, Any]]:
        page = self.json(response, what=what, reason=f"{what}_invalid")
        if not isinstance(page, list) or not all(isinstance(item, dict) for item in page):
            raise LoginFailed(f"{what}_invalid", detail=f"{where}: not a list of objects")
        return page

    def get_object(
        self, http: httpx.Client, url: str, *, what: str, token: str | None = None
    ) -> dict[str, Any]:
        """:meth:`get_json` for an answer that must be a JSON object."""
        response = self.get_json(http, url, what=what, token=token)
        return self.json_object(response, what=what, reason=f"{what}_invalid")


class UpstreamAPI:
    """A JSON API of the upstream under one base URL (a configured override: an enterprise
    host, a local fake), with the headers it asks for on every request and the query
    parameters of the first page of its lists (GitHub's ``per_page``). Methods take paths
    (``/user/emails``) and are those of :class:`UpstreamHTTP`."""

    def __init__(
        self,
        upstream: UpstreamHTTP,
        base_url: str,
        *,
        headers: Mapping[str, str] | None = None,
        page_params: Mapping[str, str] | None = None,
    ) -> None:
        self.upstream = upstream
        self.base_url = base_url.rstrip("/")
        self.headers = dict(headers or {})
        self.page_params = dict(page_params or {})

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def where(self, what: str, path: str) -> str:
        """:meth:`UpstreamHTTP.where` of a ``GET`` of ``path``."""
        return self.upstream.where(what, "GET", self.url(path))

    def get(
        self, http: httpx.Client, path: str, *, what: str, token: str, ok: tuple[int, ...] = (200,)
    ) -> httpx.Response:
        url = self.url(path)
        return self.upstream.get_json(
            http, url, what=what, token=token, headers=self.headers, ok=ok
        )

    def get_object(self, http: httpx.Client, path: str, *, what: str, token: str) -> dict[str, Any]:
        response = self.get(http, path, what=what, token=token)
        return self.upstream.json_object(response, what=what, reason=f"{what}_invalid")

    def get_list(
        self, http: httpx.Client, path: str, *, what: str, token: str
    ) -> list[dict[str, Any]]:
        url = self.url(path)
        return self.upstream.get_list(http, url, what=what, token=token, headers=self.headers)

    def get_pages(
        self, http: httpx.Client, path: str, *, what: str, token: str, max_pages: int = 10
    ) -> list[dict[str, Any]]:
        url = self.url(path)
        if self.page_params:
            url += ("&" if "?" in url else "?") + urlencode(self.page_params)
        return self.upstream.get_pages(
            http, url, what=what, token=token, headers=self.headers, max_pages=max_pages
        )
