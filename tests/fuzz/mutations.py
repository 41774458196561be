"""Hostile variants of valid requests.

A :class:`Template` is a valid request (built by :mod:`tests.fuzz.world` from a real client, a real
pending authorization, a real code...). A *plan* is a short list of operations; :func:`render`
applies a plan to a template and gives the bytes to send (:class:`~tests.fuzz.wire.Wire`). Plans
are independent of the template's values (operations name parameters, not values), so a plan
found by Hypothesis can be written down as a regression example and replayed against a fresh
template: ``render(world.token_code(), (Drop("code"),))``.

Operations:

- on the parameters (the query of a GET, the form of a POST): dropped, duplicated (same or other
  value), emptied, replaced by a hostile value, appended to, made huge, renamed, an unknown one
  added, moved between query and body, swapped for another real artifact (a code where a refresh
  token goes);
- on a JSON body (``/register``): a field set to another type or a hostile value, dropped,
  nested, the body replaced (array, string, deep nesting), or raw text that is not JSON (duplicate
  keys, ``NaN``, a BOM, lone surrogates, bytes that are not UTF-8);
- on the envelope: the content type (none, multipart, JSON for a form endpoint, a form for a JSON
  endpoint, odd charsets, garbage), the method, the path, HTTP Basic credentials (not base64, not
  UTF-8 such as ``Basic /w==``, no colon, bad percent-encoding, empty halves, wrong scheme), the
  cookies, and assorted headers.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import quote

from hypothesis import strategies as st

from tests.fuzz.wire import Pair, Raw, Value, Wire, encode_pairs, value_bytes

ABSENT: Any = object()
FORM = "application/x-www-form-urlencoded"
BOUNDARY = "fuzzboundary7MA4YWxk"


@dataclass(frozen=True)
class Template:
    """A valid request. ``fields`` are the query of a GET or the form body of a POST; ``body``
    is a JSON body instead (``/register``). ``basic`` is the client's valid HTTP Basic
    credentials when the request carries them; ``artifacts`` are other real values (codes,
    tokens, client ids) a swap may put in a field."""

    endpoint: str
    method: str
    path: str
    fields: tuple[Pair, ...] = ()
    body: Any = ABSENT
    headers: tuple[tuple[str, str], ...] = ()
    basic: tuple[str, str] | None = None
    artifacts: tuple[tuple[str, str], ...] = ()
    # The value of the one field whose real, single-use credential this request spends (a
    # code, a refresh token, a login id, an upstream state): see verdict.spends_credential.
    spends: str | None = None

    @property
    def names(self) -> list[str]:
        return [str(k) for k, _ in self.fields]

    def value(self, name: str) -> Value | None:
        for key, value in self.fields:
            if key == name:
                return value
        return None


@dataclass
class Draft:
    """A template being mutated."""

    method: str
    path: bytes
    query: list[Pair]
    form: list[Pair] | None
    body: Any
    headers: list[tuple[str, str]]
    basic: tuple[str, str] | None
    artifacts: dict[str, str]
    body_kind: str = "default"
    raw_body: bytes | None = None
    framing: str = "length"

    @classmethod
    def of(cls, template: Template) -> Draft:
        post = template.method != "GET"
        headers = list(template.headers)
        if template.basic is not None:
            headers.append(("Authorization", basic_header(*template.basic)))
        return cls(
            method=template.method,
            path=template.path.encode("ascii"),
            query=[] if post else list(template.fields),
            form=list(template.fields) if post and template.body is ABSENT else None,
            body=template.body,
            headers=headers,
            basic=template.basic,
            artifacts=dict(template.artifacts),
        )

    def fields(self) -> list[Pair]:
        return self.form if self.form is not None else self.query

    def wire(self) -> Wire:
        body, content_type = self._body()
        headers = [(k, v) for k, v in self.headers]
        if content_type is not None and not any(k.lower() == "content-type" for k, _ in headers):
            headers.append(("Content-Type", content_type))
        return Wire(
            method=self.method,
            path=self.path,
            query=encode_pairs(self.query),
            headers=tuple(headers),
            body=body,
            framing=self.framing,
        )

    def _body(self) -> tuple[bytes, str | None]:
        if self.raw_body is not None:
            return self.raw_body, None if self.body_kind == "default" else _ct(self.body_kind)
        if self.form is not None:
            return _form_body(self.form, self.body_kind)
        if self.body is not ABSENT:
            return _json_body(self.body, self.body_kind)
        return b"", None


def basic_header(client_id: str, secret: str) -> str:
    """RFC 6749 section 2.3.1: each half form-urlencoded, then RFC 7617's base64."""
    raw = f"{quote(client_id, safe='')}:{quote(secret, safe='')}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


def _latin1(value: Value) -> str:
    return value_bytes(value).decode("latin-1")


CONTENT_TYPES = {
    "form": FORM,
    "none": None,
    "form-charset-latin1": FORM + "; charset=ISO-8859-1",
    "form-charset-utf16": FORM + "; charset=utf-16",
    "form-charset-bogus": FORM + "; charset=x-no-such-charset",
    "form-params-garbage": FORM + ";;; charset==; =x",
    "json": "application/json",
    "json-charset-utf16": "application/json; charset=utf-16",
    "json-charset-bogus": "application/json; charset=x-no-such-charset",
    "merge-patch-json": "application/merge-patch+json",
    "multipart": f"multipart/form-data; boundary={BOUNDARY}",
    "multipart-no-boundary": "multipart/form-data",
    "multipart-empty-boundary": 'multipart/form-data; boundary=""',
    "text": "text/plain",
    "octets": "application/octet-stream",
    "garbage": "\x00\xff/\x01; \xfe",
    "huge": "application/" + "x" * 9000,
    "upper": FORM.upper(),
}


def _ct(kind: str) -> str | None:
    return CONTENT_TYPES.get(kind, FORM)


def _form_body(pairs: list[Pair], kind: str) -> tuple[bytes, str | None]:
    if kind in ("default", "form"):
        return encode_pairs(pairs), FORM
    if kind.startswith("json") or kind == "merge-patch-json":
        obj = {_latin1(k): _latin1(v) for k, v in pairs}
        text = json.dumps(obj)
        encoded = text.encode("utf-16") if kind == "json-charset-utf16" else text.encode()
        return encoded, _ct(kind)
    if kind == "multipart":
        return _multipart(pairs), _ct(kind)
    if kind == "form-charset-utf16":
        return encode_pairs(pairs).decode("latin-1").encode("utf-16"), _ct(kind)
    if kind == "multipart-empty-boundary":
        return b"--\r\n" + encode_pairs(pairs) + b"\r\n----\r\n", _ct(kind)
    return encode_pairs(pairs), _ct(kind)


def _multipart(pairs: list[Pair]) -> bytes:
    parts = []
    for key, value in pairs:
        name = value_bytes(key).replace(b'"', b"%22")
        parts.append(
            b"--" + BOUNDARY.encode() + b"\r\n"
            b'Content-Disposition: form-data; name="' + name + b'"\r\n\r\n' + value_bytes(value)
        )
    return b"\r\n".join(parts) + b"\r\n--" + BOUNDARY.encode() + b"--\r\n"


def _json_body(body: Any, kind: str) -> tuple[bytes, str | None]:
    if kind in ("default", "json"):
        return json.dumps(body).encode(), "application/json"
    if kind == "json-charset-utf16":
        return json.dumps(body).encode("utf-16"), _ct(kind)
    if kind in ("form", "form-charset-latin1", "multipart"):
        pairs: list[Pair] = []
        items = body.items() if isinstance(body, dict) else []
        for key, value in items:
            for item in value if isinstance(value, list) else [value]:
                pairs.append((str(key), item if isinstance(item, str) else json.dumps(item)))
        if kind == "multipart":
            return _multipart(pairs), _ct(kind)
        return encode_pairs(pairs), _ct(kind)
    return json.dumps(body).encode(), _ct(kind)


# -- operations ----------------------------------------------------------------------------------


class Op:
    def apply(self, draft: Draft) -> None:
        raise NotImplementedError


def _index(pairs: list[Pair], name: str) -> int | None:
    for i, (key, _) in enumerate(pairs):
        if key == name:
            return i
    return None


@dataclass(frozen=True)
class Drop(Op):
    name: str

    def apply(self, draft: Draft) -> None:
        pairs = draft.fields()
        pairs[:] = [p for p in pairs if p[0] != self.name]


@dataclass(frozen=True)
class Duplicate(Op):
    """The parameter again: with the same value (``value`` None) or another one, after it or
    first."""

    name: str
    value: Value | None = None
    first: bool = False

    def apply(self, draft: Draft) -> None:
        pairs = draft.fields()
        i = _index(pairs, self.name)
        current = pairs[i][1] if i is not None else ""
        pair = (self.name, current if self.value is None else self.value)
        if self.first:
            pairs.insert(0, pair)
        else:
            pairs.append(pair)


@dataclass(frozen=True)
class Set(Op):
    """Replace the parameter's value (added when the request has none)."""

    name: str
    value: Value

    def apply(self, draft: Draft) -> None:
        pairs = draft.fields()
        i = _index(pairs, self.name)
        if i is None:
            pairs.append((self.name, self.value))
        else:
            pairs[i] = (self.name, self.value)


@dataclass(frozen=True)
class Append(Op):
    name: str
    suffix: Value
    prepend: bool = False

    def apply(self, draft: Draft) -> None:
        pairs = draft.fields()
        i = _index(pairs, self.name)
        if i is None:
            return
        current, suffix = pairs[i][1], self.suffix
        if isinstance(current, str) and isinstance(suffix, str):
            joined: Value = suffix + current if self.prepend else current + suffix
        else:
            a, b = value_bytes(current), value_bytes(suffix)
            data = b + a if self.prepend else a + b
            joined = Raw(data) if isinstance(suffix, Raw) or isinstance(current, Raw) else data
        pairs[i] = (self.name, joined)


@dataclass(frozen=True)
class Huge(Op):
    name: str
    size: int

    def apply(self, draft: Draft) -> None:
        pairs = draft.fields()
        i = _index(pairs, self.name)
        current = value_bytes(pairs[i][1]) if i is not None else b""
        value = (current or b"A") * (self.size // max(1, len(current)) + 1)
        Set(self.name, value[: self.size].decode("latin-1")).apply(draft)


@dataclass(frozen=True)
class Extra(Op):
    name: Value
    value: Value

    def apply(self, draft: Draft) -> None:
        draft.fields().append((self.name, self.value))


@dataclass(frozen=True)
class Rename(Op):
    name: str
    new: Value

    def apply(self, draft: Draft) -> None:
        pairs = draft.fields()
        i = _index(pairs, self.name)
        if i is not None:
            pairs[i] = (self.new, pairs[i][1])


@dataclass(frozen=True)
class Move(Op):
    """The parameter moves from the body to the query string (or the other way)."""

    name: str

    def apply(self, draft: Draft) -> None:
        if draft.form is None:
            return
        src, dst = (draft.form, draft.query)
        i = _index(src, self.name)
        if i is None:
            src, dst = dst, src
            i = _index(src, self.name)
        if i is not None:
            dst.append(src.pop(i))


@dataclass(frozen=True)
class Query(Op):
    """A parameter added to the query string, also of a POST."""

    name: Value
    value: Value

    def apply(self, draft: Draft) -> None:
        draft.query.append((self.name, self.value))


@dataclass(frozen=True)
class Swap(Op):
    """The parameter gets another real value of the world (``artifact``: its key)."""

    name: str
    artifact: str

    def apply(self, draft: Draft) -> None:
        value = draft.artifacts.get(self.artifact)
        if value is not None:
            Set(self.name, value).apply(draft)


@dataclass(frozen=True)
class Body(Op):
    """How the body is encoded and labelled (a key of :data:`CONTENT_TYPES`)."""

    kind: str

    def apply(self, draft: Draft) -> None:
        draft.body_kind = self.kind


@dataclass(frozen=True)
class RawBody(Op):
    """A body that is not what the content type says (JSON that is not JSON, bytes that are
    not UTF-8); ``kind`` labels it."""

    data: bytes
    kind: str = "default"

    def apply(self, draft: Draft) -> None:
        draft.raw_body = self.data
        if self.kind != "default":
            draft.body_kind = self.kind
        elif draft.body is not ABSENT:
            draft.body_kind = "json"


@dataclass(frozen=True)
class JSet(Op):
    """Set ``key`` of the JSON body (its first element's key, for a list) to ``value``."""

    key: str
    value: Any

    def apply(self, draft: Draft) -> None:
        if isinstance(draft.body, dict):
            draft.body = {**draft.body, self.key: self.value}


@dataclass(frozen=True)
class JDrop(Op):
    key: str

    def apply(self, draft: Draft) -> None:
        if isinstance(draft.body, dict):
            draft.body = {k: v for k, v in draft.body.items() if k != self.key}


@dataclass(frozen=True)
class JWrap(Op):
    """The field's value nested ``depth`` times in a list (or an object)."""

    key: str
    depth: int
    in_object: bool = False

    def apply(self, draft: Draft) -> None:
        if not isinstance(draft.body, dict) or self.key not in draft.body:
            return
        value = draft.body[self.key]
        for _ in range(self.depth):
            value = {"x": value} if self.in_object else [value]
        draft.body = {**draft.body, self.key: value}


@dataclass(frozen=True)
class JReplace(Op):
    """The whole JSON body replaced (an array of it, a string, null, deep nesting)."""

    shape: str

    def apply(self, draft: Draft) -> None:
        body = draft.body
        if self.shape == "array":
            draft.body = [body]
        elif self.shape == "string":
            draft.body = json.dumps(body)
        elif self.shape == "null":
            draft.body = None
        elif self.shape == "empty":
            draft.body = {}
        elif self.shape.startswith("deep"):
            depth = int(self.shape[4:])
            draft.raw_body = b"[" * depth + json.dumps(body).encode() + b"]" * depth


@dataclass(frozen=True)
class Method(Op):
    method: str

    def apply(self, draft: Draft) -> None:
        draft.method = self.method


@dataclass(frozen=True)
class Path(Op):
    """The path changed (raw bytes: a trailing slash, an encoded NUL, dot segments...)."""

    suffix: bytes = b""
    prefix: bytes = b""
    upper: bool = False

    def apply(self, draft: Draft) -> None:
        path = draft.path.upper() if self.upper else draft.path
        draft.path = self.prefix + path + self.suffix


@dataclass(frozen=True)
class Header(Op):
    """Set (``add=False``: replacing any of that name), add (a second one) or drop (``value``
    None) a header."""

    name: str
    value: str | None
    add: bool = False

    def apply(self, draft: Draft) -> None:
        if not self.add:
            draft.headers = [(k, v) for k, v in draft.headers if k.lower() != self.name.lower()]
        if self.value is not None:
            draft.headers.append((self.name, self.value))


@dataclass(frozen=True)
class BasicAuth(Op):
    """HTTP Basic credentials made malformed or wrong (``kind``, see :data:`BASIC_KINDS`)."""

    kind: str

    def apply(self, draft: Draft) -> None:
        client_id, secret = draft.basic or ("mcp_nobody", "no-secret")
        Header("Authorization", basic_variant(self.kind, client_id, secret)).apply(draft)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def basic_variant(kind: str, client_id: str, secret: str) -> str:
    valid = basic_header(client_id, secret)[len("Basic ") :]
    variants = {
        "not-utf8": "Basic /w==",  # base64 of the byte 0xff
        "not-utf8-pair": "Basic " + _b64(b"\xff\xfe:\xff"),
        "not-base64": "Basic !!!not-base64!!!",
        "bad-padding": "Basic " + valid.rstrip("=") + "===",
        "truncated": "Basic " + valid[:-3],
        "empty": "Basic ",
        "scheme-only": "Basic",
        "no-colon": "Basic " + _b64(client_id.encode()),
        "empty-id": "Basic " + _b64(b":" + secret.encode()),
        "empty-secret": "Basic " + _b64(client_id.encode() + b":"),
        "percent-error": "Basic " + _b64(b"%zz:%g0"),
        "percent-not-utf8": "Basic " + _b64(b"%ff%fe:%c0%af"),
        "nul": "Basic " + _b64(client_id.encode() + b"\x00:" + secret.encode()),
        "control": "Basic " + _b64(b"id\x1b[0m:sec\r\nret"),
        "wrong-secret": basic_header(client_id, secret + "x"),
        "unknown-client": basic_header("mcp_" + "x" * 32, secret),
        "huge": "Basic " + _b64(b"a" * 6000 + b":" + b"b" * 6000),
        "lowercase-scheme": "basic " + valid,
        "extra-spaces": "Basic    " + valid + "   ",
        "tab": "Basic\t" + valid,
        "trailing-garbage": "Basic " + valid + " extra",
        "bearer": "Bearer " + valid,
        "other-scheme": "Digest username=x",
        "raw-latin1": "Basic \xff\xfe",
        "unicode-id": basic_header("clïent\u202e", secret),
    }
    return variants[kind]


BASIC_KINDS = (
    "not-utf8",
    "not-utf8-pair",
    "not-base64",
    "bad-padding",
    "truncated",
    "empty",
    "scheme-only",
    "no-colon",
    "empty-id",
    "empty-secret",
    "percent-error",
    "percent-not-utf8",
    "nul",
    "control",
    "wrong-secret",
    "unknown-client",
    "huge",
    "lowercase-scheme",
    "extra-spaces",
    "tab",
    "trailing-garbage",
    "bearer",
    "other-scheme",
    "raw-latin1",
    "unicode-id",
)
MALFORMED_BASIC = (
    "not-utf8",
    "not-utf8-pair",
    "not-base64",
    "truncated",
    "no-colon",
    "empty-id",
    "empty-secret",
    "percent-error",
    "percent-not-utf8",
    "huge",
)
"""Basic credentials that cannot be read at all: always 401 ``invalid_client``."""


@dataclass(frozen=True)
class Cookie(Op):
    """The cookies: dropped, replaced by garbage, a cookie's signature broken, or duplicated."""

    kind: str

    def apply(self, draft: Draft) -> None:
        current = next((v for k, v in draft.headers if k.lower() == "cookie"), "")
        if self.kind == "drop":
            value: str | None = None
        elif self.kind == "garbage":
            value = "broker_browser=\xff\x00; broker_session=;;; =; \x7f"
        elif self.kind == "tampered":
            value = "; ".join(
                part[:-2] + ("AA" if not part.endswith("AA") else "BB")
                for part in current.split("; ")
                if part
            )
        elif self.kind == "duplicated":
            value = current + "; " + current.replace("=", "=x", 1) if current else "a=b; a=c"
        elif self.kind == "huge":
            value = current + "; junk=" + "j" * 8000
        else:  # "host-prefixed": names a secure-cookie deployment would use
            value = current.replace("broker_", "__Host-broker_")
        Header("Cookie", value).apply(draft)


@dataclass(frozen=True)
class Chunked(Op):
    """Over a socket: the body sent with chunked transfer coding (in-process: no effect)."""

    def apply(self, draft: Draft) -> None:
        draft.framing = "chunked"


def render(template: Template, plan: tuple[Op, ...] | list[Op] = ()) -> Wire:
    draft = Draft.of(template)
    for op in plan:
        op.apply(draft)
    return draft.wire()


# -- strategies ----------------------------------------------------------------------------------

NASTY_TEXT = (
    "",
    " ",
    "\x00",
    "a\x00b",
    "\x01\x02\x1b[31m",
    "\r\nSet-Cookie: x=y",
    "\t",
    "\x7f",
    '"',
    "\\",
    "'",
    "%",
    "%00",
    "%zz",
    "&",
    "=",
    "+",
    "é",
    "tokén",
    "\u202egnp.exe",
    "\ufeff",
    "\U0001f600",
    "\u0085\u2028\u2029",
    "..",
    "../../etc/passwd",
    "javascript:alert(1)",
    "<script>alert(1)</script>",
    "' OR '1'='1",
    "${jndi:ldap://x}",
    "{{7*7}}",
    "none",  # also prompt=none: an error response, the request's pending login not kept
    "none login",
    "consent",
    "null",
    "[]",
    "{}",
    "0",
    "-1",
    "1e999",
    "NaN",
    "https://evil.example/cb",
    "http://127.0.0.1:5555/callback",
    "https://127.0.0.1/client.json",
    "https://[::1]/client.json",
    "https://user@app.example.com/client.json",
    "https://app.example.com/a/../client.json",
)
BAD_UTF8 = (
    b"\xff",
    b"\xfe\xff",
    b"\xc0\xaf",
    b"\xc0\x80",
    b"\xed\xa0\x80",
    b"\xe2\x82",
    b"\x80",
    b"\xf8\x88\x80\x80\x80",
    b"a\xffb",
)
RAW_TRICKS = (b"%", b"%zz", b"%f", b"a%00b", b"%C0%80", b"+", b"&&", b"=", b"%u0041", b"\xff", b"#")

CONTROL_CHARS = st.characters(max_codepoint=0x1F) | st.sampled_from("\x7f\x85\u2028\u2029")


def hostile_values() -> st.SearchStrategy[Value]:
    return st.one_of(
        st.sampled_from(NASTY_TEXT),
        st.text(max_size=24),
        st.text(CONTROL_CHARS, min_size=1, max_size=4),
        st.binary(min_size=1, max_size=12),
        st.sampled_from(BAD_UTF8),
        st.sampled_from(BAD_UTF8).map(Raw),
        st.sampled_from(RAW_TRICKS).map(Raw),
    )


def hostile_names() -> st.SearchStrategy[Value]:
    return st.one_of(
        st.sampled_from(
            ("", "x", "a\x00b", "client_id ", "CLIENT_ID", "é", "scope[]", "__proto__")
        ),
        st.sampled_from(BAD_UTF8),
        st.sampled_from(RAW_TRICKS).map(Raw),
        st.text(min_size=1, max_size=8),
    )


HUGE_SIZES = (300, 2049, 5000, 70_000)
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "FOO", "post")
PATH_CHANGES = (
    Path(suffix=b"/"),
    Path(suffix=b"%00"),
    Path(suffix=b"/.."),
    Path(suffix=b";jsessionid=x"),
    Path(suffix=b"%2f"),
    Path(suffix=b"%ff"),
    Path(prefix=b"/"),
    Path(prefix=b"/."),
    Path(upper=True),
)
HEADER_CHANGES = (
    Header("Host", "evil.example"),
    Header("Host", "127.0.0.1:8000\xff"),
    Header("Host", ""),
    Header("X-Forwarded-For", "\xff, 10.0.0.1, garbage"),
    Header("X-Forwarded-Proto", "gopher"),
    Header("Origin", "https://evil.example"),
    Header("Origin", "null"),
    Header("Accept", "application/json;q=\xff"),
    Header("Accept-Charset", "utf-7"),
    Header("Content-Encoding", "gzip"),
    Header("Expect", "100-continue"),
    Header("MCP-Protocol-Version", "\x00"),
    Header("Authorization", "Bearer \xff\x00"),
    Header("Content-Type", FORM, add=True),
    Header("User-Agent", "\xff" * 300),
    Header("Cookie", None),
)


@st.composite
def field_ops(draw: st.DrawFn, names: list[str], artifacts: list[str], post: bool) -> Op:
    name = draw(st.sampled_from(names)) if names else "x"
    kinds = ["drop", "duplicate", "empty", "replace", "append", "huge", "extra", "rename"]
    if artifacts:
        kinds.append("swap")
    if post:
        kinds.append("move")
    kind = draw(st.sampled_from(kinds))
    if kind == "drop":
        return Drop(name)
    if kind == "duplicate":
        other = draw(st.none() | hostile_values())
        return Duplicate(name, other, first=draw(st.booleans()))
    if kind == "empty":
        return Set(name, "")
    if kind == "replace":
        return Set(name, draw(hostile_values()))
    if kind == "append":
        return Append(name, draw(hostile_values()), prepend=draw(st.booleans()))
    if kind == "huge":
        return Huge(name, draw(st.sampled_from(HUGE_SIZES)))
    if kind == "extra":
        return Extra(draw(hostile_names()), draw(hostile_values()))
    if kind == "rename":
        return Rename(name, draw(hostile_names()))
    if kind == "swap":
        return Swap(name, draw(st.sampled_from(artifacts)))
    return Move(name)


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(NASTY_TEXT),
    st.text(max_size=16),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=6) | st.sampled_from(NASTY_TEXT), inner, max_size=3)
    ),
    max_leaves=8,
)
REGISTER_KEYS = (
    "redirect_uris",
    "client_name",
    "token_endpoint_auth_method",
    "grant_types",
    "response_types",
    "application_type",
    "scope",
    "client_uri",
    "logo_uri",
    "policy_uri",
    "tos_uri",
    "software_id",
    "software_version",
    "contacts",
    "jwks",
    "jwks_uri",
    "client_id",
    "client_secret",
    "software_statement",
)
RAW_JSON = (
    b"",
    b"{",
    b"{}}",
    b"{'redirect_uris': []}",
    b'{"redirect_uris": ["http://127.0.0.1/cb"], "redirect_uris": "x"}',
    b'{"redirect_uris": ["http://127.0.0.1/cb"]} trailing',
    b'{"redirect_uris": [NaN, Infinity, -Infinity]}',
    b'\xef\xbb\xbf{"redirect_uris": ["http://127.0.0.1/cb"]}',
    b'{"redirect_uris": ["http://127.0.0.1/cb"], "client_name": "\\ud800"}',
    b'{"redirect_uris": ["http://127.0.0.1/\\udfff"]}',
    b'{"redirect_uris": ["http://127.0.0.1/cb"], "client_name": "\xff\xfe"}',
    b'{"\\u0000": 1, "redirect_uris": ["http://127.0.0.1/cb"]}',
    b'{"redirect_uris": ["http://127.0.0.1/cb"], "client_name": "a\\u0000b"}',
    b'{"redirect_uris": 1e99999}',
    b'{"redirect_uris": ' + b"1" * 5000 + b"}",
    b"\x00\x00\x00{",
    b"null",
    b"[]",
    b'"a string"',
)


def hostile_redirect_uris() -> st.SearchStrategy[Any]:
    from tests.test_redirect_uri_hostile import HOSTILE

    uris = sorted({requested for _, requested in HOSTILE})
    return st.one_of(
        st.sampled_from(uris),
        st.sampled_from(NASTY_TEXT),
        st.text(max_size=30).map(lambda t: "http://127.0.0.1/" + t),
        st.text(max_size=20).map(lambda t: "https://" + t),
        st.text(max_size=20).map(lambda t: t + "://cb"),
    )


@st.composite
def json_ops(draw: st.DrawFn) -> Op:
    kind = draw(st.sampled_from(["set", "set-uris", "drop", "wrap", "replace", "raw", "raw-bytes"]))
    key = draw(st.sampled_from(REGISTER_KEYS))
    if kind == "set":
        return JSet(key, draw(json_values))
    if kind == "set-uris":
        uris = draw(st.lists(hostile_redirect_uris() | json_values, min_size=0, max_size=3))
        return JSet("redirect_uris", draw(st.sampled_from([uris, uris[0] if uris else None])))
    if kind == "drop":
        return JDrop(key)
    if kind == "wrap":
        return JWrap(key, draw(st.sampled_from([1, 2, 9, 50])), in_object=draw(st.booleans()))
    if kind == "replace":
        return JReplace(
            draw(st.sampled_from(["array", "string", "null", "empty", "deep20", "deep5000"]))
        )
    if kind == "raw":
        return RawBody(draw(st.sampled_from(RAW_JSON)))
    return RawBody(draw(st.binary(max_size=40)))


def envelope_ops(*, auth: bool, cookies: bool, json_body: bool) -> st.SearchStrategy[Op]:
    """Changes of the envelope; the method and the path less often (most such requests end at a
    405 or 404, the first check)."""
    bodies = st.sampled_from(
        [Body(k) for k in CONTENT_TYPES if not (json_body and k == "json")]
        + ([] if json_body else [Body("json")])
    )
    basic = st.sampled_from(BASIC_KINDS).map(BasicAuth)
    choices: list[st.SearchStrategy[Op]] = [
        bodies,
        bodies,
        basic,
        basic if auth else st.sampled_from(HEADER_CHANGES),
        st.sampled_from(HEADER_CHANGES),
        st.sampled_from(METHODS).map(Method),
        st.sampled_from(PATH_CHANGES),
        st.just(Chunked()),
    ]
    if auth:
        choices.append(st.just(Header("Authorization", None)))
    if cookies:
        choices.append(
            st.sampled_from(
                ["drop", "garbage", "tampered", "duplicated", "huge", "host-prefixed"]
            ).map(Cookie)
        )
    return st.one_of(*choices)


def plans(
    template_names: list[str],
    *,
    post: bool,
    artifacts: list[str] | None = None,
    auth: bool = False,
    cookies: bool = False,
    json_body: bool = False,
    max_ops: int = 4,
) -> st.SearchStrategy[tuple[Op, ...]]:
    """Plans of 1 to ``max_ops`` operations for a template with these parameter names."""
    field_level: st.SearchStrategy[Op] = (
        json_ops() if json_body else field_ops(template_names, artifacts or [], post)
    )
    # Mostly parameter-level changes (they reach deep code), some on the envelope.
    op = st.one_of(
        field_level,
        field_level,
        field_level,
        envelope_ops(auth=auth, cookies=cookies, json_body=json_body),
    )
    return st.lists(op, min_size=1, max_size=max_ops).map(tuple)


@dataclass(frozen=True)
class Case:
    """A template and the plan applied to it (what a failure report shows)."""

    template: Template
    plan: tuple[Op, ...] = field(default_factory=tuple)

    def wire(self) -> Wire:
        return render(self.template, self.plan)

    def with_plan(self, plan: tuple[Op, ...]) -> Case:
        return replace(self, plan=plan)
