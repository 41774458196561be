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
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

from .errors import LoginFailed, UpstreamUnavailable

__all__ = ["MAX_RESPONSE_BYTES", "UpstreamHTTP", "bare_url"]

MAX_RESPONSE_BYTES = 1 << 20
"""Largest upstream answer read (an identity, a token response, a discovery document)."""


def bare_url(url: str) -> str:
    """``url`` without query and fragment, for log lines (queries may carry codes)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(invalid URL)"
    return urlunsplit(parts._replace(query="", fragment=""))


class UpstreamHTTP:
    """Back-channel requests of one configured provider."""

    def __init__(self, provider: str, *, timeout: float) -> None:
        self.provider = provider
        self.timeout = timeout

    def where(self, what: str, method: str, url: str) -> str:
        return f"{what} {method} {bare_url(url)}"

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
        origin = urlsplit(url)[:2]
        for _ in range(max_pages):
            response = self.get_json(http, url, what=what, token=token, headers=headers)
            page = self.json(response, what=what, reason=f"{what}_invalid")
            if not isinstance(page, list) or not all(isinstance(item, dict) for item in page):
                raise LoginFailed(f"{what}_invalid", detail=f"{where}: not a list of objects")
            items.extend(page)
            next_url = response.links.get("next", {}).get("url")
            if not next_url:
                return items
            url = urljoin(str(response.url), next_url)
            if urlsplit(url)[:2] != origin:
                raise LoginFailed(f"{what}_invalid", detail=f"{where}: next page on another host")
        raise LoginFailed(f"{what}_invalid", detail=f"{where}: more than {max_pages} pages")

    def get_object(
        self, http: httpx.Client, url: str, *, what: str, token: str | None = None
    ) -> dict[str, Any]:
        """:meth:`get_json` for an answer that must be a JSON object."""
        response = self.get_json(http, url, what=what, token=token)
        return self.json_object(response, what=what, reason=f"{what}_invalid")
