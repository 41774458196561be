"""What the fuzzer found, and the two classes reported before it existed, as plain examples: each
one a valid request of the world changed by one plan (docs/fuzzing.md says how to add one)."""

from __future__ import annotations

import html
import re
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest

from broker.oauth2.clients import authenticate_client_secret_basic
from tests.fuzz.mutations import (
    MALFORMED_BASIC,
    Append,
    BasicAuth,
    Duplicate,
    Header,
    Op,
    Query,
    Set,
    Template,
)
from tests.fuzz.runner import run_case
from tests.fuzz.verdict import description_ok
from tests.fuzz.wire import Raw
from tests.fuzz.world import FuzzWorld

ROOT = Path(__file__).resolve().parents[2]

# -- reported: HTTP Basic credentials that are not UTF-8 (and other malformed ones) -------------


def _basic_templates(world: FuzzWorld) -> dict[str, Template]:
    return {
        "/token code": world.token_code(confidential=True),
        "/token client_credentials": world.token_client_credentials(),
        "/token token-exchange": world.token_exchange(),
        "/revoke": world.revoke(),
        "/introspect": world.introspect(),
    }


@pytest.mark.parametrize("kind", MALFORMED_BASIC)
def test_malformed_basic_credentials_are_401_invalid_client(world: FuzzWorld, kind: str) -> None:
    """``Authorization: Basic /w==`` (the byte 0xff) was a 500 at /token, /revoke and
    /introspect: Authlib's reader decodes it as UTF-8 unguarded. Now one reader,
    :func:`broker.oauth2.clients.basic_credentials`, refuses it (RFC 6749 section 5.2)."""
    for name, template in _basic_templates(world).items():
        answer = run_case(world, template, (BasicAuth(kind),))
        assert answer.status == 401, (name, answer.status, answer.text)
        assert answer.json()["error"] == "invalid_client", name
        assert answer.headers["WWW-Authenticate"].startswith("Basic "), name


def test_basic_credentials_beside_another_client_id_in_the_body_are_401(
    world: FuzzWorld,
) -> None:
    """Found by the fuzzer: Basic credentials of the confidential client, and ``client_id= `` in
    the body. Authlib tried the public-client method first, on the body's id, and answered 400
    without ``WWW-Authenticate``. RFC 6749 section 2.3 allows one method per request, and
    section 5.2 demands 401 when the client used the Authorization header: the Basic credentials
    alone authenticate, and a body naming another client is refused."""
    for plan in (
        (Duplicate("client_id", " "),),
        (Set("client_id", world.public.client_id),),
        (Set("client_id", "mcp_unknown"), BasicAuth("wrong-secret")),
    ):
        answer = run_case(world, world.token_code(confidential=True), plan)
        assert answer.status == 401, (plan, answer.text)
        assert answer.json()["error"] == "invalid_client"
        assert answer.headers["WWW-Authenticate"].startswith("Basic ")
    # The body naming the very client of the Basic credentials is fine.
    plan = (Set("client_id", world.confidential.client_id),)
    answer = run_case(world, world.token_code(confidential=True), plan)
    assert answer.status == 200, answer.text


def test_one_place_decodes_client_credentials(world: FuzzWorld) -> None:
    """Authlib's own Basic reader (``extract_basic_authorization``) is not used: the broker's
    ``client_secret_basic`` method reads the header with ``basic_credentials``, and nothing else
    in the broker or its providers decodes an Authorization header."""
    server = world.app.extensions["broker"].server
    assert server._client_auth._methods["client_secret_basic"] is authenticate_client_secret_basic
    reads_header = re.compile(
        r"""headers\.get\(\s*["']Authorization["']|HTTP_AUTHORIZATION|\.authorization\b"""
        r"|extract_basic_authorization"
    )
    decodes = re.compile(r"b64decode|\bbasic\b", re.IGNORECASE)
    readers = [
        str(path.relative_to(ROOT))
        for path in sorted([*(ROOT / "broker").rglob("*.py"), *(ROOT / "providers").rglob("*.py")])
        if reads_header.search(text := path.read_text()) and decodes.search(text)
    ]
    assert readers == ["broker/oauth2/clients.py"]


# -- reported: /authorize never echoes a request value into error_description ------------------

MARKED = ["Zq9é", "Zq9\u202e", "Zq9\x00", 'Zq9"', "Zq9\\", "Zq9\x1b", "Zq9\U0001f600"]
AUTHORIZE_PARAMETERS = [
    "response_type",
    "client_id",
    "redirect_uri",
    "state",
    "code_challenge",
    "code_challenge_method",
    "resource",
    "scope",
    "prompt",
]


def _descriptions(answer_location: str | None, page: str) -> list[str]:
    found = []
    if answer_location and "?" in answer_location:
        found += [v for k, v in parse_qsl(urlsplit(answer_location).query) if k != "state"]
    found += re.findall(r'<p id="message">(.*?)</p>', page, re.DOTALL)
    return found


@pytest.mark.parametrize("parameter", AUTHORIZE_PARAMETERS)
def test_authorize_never_echoes_a_value_into_the_error(world: FuzzWorld, parameter: str) -> None:
    """RFC 6749 section 4.1.2.1: ``error_description`` is printable ASCII without '"' and '\\';
    a value outside it in any parameter was a 500 (Authlib refuses to build such an error) when
    Authlib echoed the value. Descriptions are fixed strings: the value never appears in them, as
    a redirect to the client or as the error page."""
    for value in MARKED:
        for plan in ((Set(parameter, value),), (Append(parameter, value),)):
            answer = run_case(world, world.authorize(signed_in=True), plan)
            assert answer.status in (302, 400), (parameter, value, answer.status)
            for text in _descriptions(answer.location, html.unescape(answer.text)):
                assert "Zq9" not in text, (parameter, value, text)
            params = dict(parse_qsl(urlsplit(answer.location or "").query))
            if "error_description" in params:
                assert description_ok(params["error_description"]), params


# -- found by the fuzzer -----------------------------------------------------------------------

FORGED_HOST: list[Op] = [Header("Host", "evil.example")]


@pytest.mark.parametrize(
    "make",
    ["token_code", "token_refresh", "token_client_credentials", "introspect", "revoke"],
)
def test_a_forged_host_header_is_not_a_500(world: FuzzWorld, make: str) -> None:
    """``Host: evil.example`` over plain http: Authlib refuses an http URL on a non-loopback
    host (``insecure_transport``), and the URL it got was built from the Host header, so every
    OAuth endpoint answered 500. The broker's requests now carry the issuer's URL."""
    answer = run_case(world, getattr(world, make)(), FORGED_HOST)
    assert answer.status == 200, answer.text


def test_a_forged_host_header_at_authorize(world: FuzzWorld) -> None:
    answer = run_case(world, world.authorize(signed_in=True), FORGED_HOST)
    assert answer.status == 302 and (answer.location or "").startswith(world.public.redirect_uri)


RAW_QUERY = [Query("state", Raw(b"\xff")), Query("x", Raw(b"\xc0\xaf")), Query(Raw(b"\xfe"), "1")]


@pytest.mark.parametrize(
    "make",
    [
        "token_code",
        "register",
        "revoke",
        "introspect",
        "authorize",
        "consent_page",
        "consent_form",
        "login_page",
        "login_form",
        "callback",
        "account_page",
    ],
)
def test_raw_bytes_that_are_not_utf8_in_the_query(world: FuzzWorld, make: str) -> None:
    """``GET /login/local?login=\\xff`` (raw bytes, not percent-encoded) was a 500 on every
    endpoint: Werkzeug decodes the raw query string as strict UTF-8. They are now read as
    percent-encoded bytes, which stay encoded when they are not UTF-8."""
    factories = {
        "authorize": lambda: world.authorize(signed_in=True),
        "login_page": lambda: world.login_form(submit=False),
        "login_form": lambda: world.login_form(submit=True),
    }
    for op in RAW_QUERY:
        template = factories[make]() if make in factories else getattr(world, make)()
        run_case(world, template, (op,))


@pytest.mark.parametrize("value", ["\x80", "é", "\U0001f600", "\x00"])
@pytest.mark.parametrize("form", ["consent_form", "login_form", "account_disconnect"])
def test_a_csrf_token_outside_ascii_is_a_refused_form(
    world: FuzzWorld, form: str, value: str
) -> None:
    """Found by the long profile: ``csrf=%C2%80`` was a 500 on the consent form, the login form
    and the account page's forms: ``hmac.compare_digest`` raises ``TypeError`` for a str with
    non-ASCII characters. The token is compared as bytes: 400 "Form expired"."""
    factories = {
        "consent_form": world.consent_form,
        "login_form": lambda: world.login_form(submit=True),
        "account_disconnect": lambda: world.account_disconnect(everything=False),
    }
    answer = run_case(world, factories[form](), (Set("csrf", value),))
    assert answer.status == 400 and "Form expired" in answer.text, (form, answer.status)


@pytest.mark.parametrize("signed_in", [False, True])
def test_prompt_none_that_cannot_be_honoured_stores_nothing(
    world: FuzzWorld, signed_in: bool
) -> None:
    """Found while fuzzing: ``prompt=none`` from a browser without a session (``login_required``)
    stored a pending login, marked completed, for a request the broker refused; run_case checks
    that the refusal leaves the database as it was. Signed in and approved before, the browser
    gets its code without interaction."""
    answer = run_case(world, world.authorize(signed_in), (Set("prompt", "none"),))
    location = answer.location or ""
    assert answer.status == 302 and location.startswith(world.public.redirect_uri), location
    result = dict(parse_qsl(urlsplit(location).query))
    if signed_in:
        assert "code" in result, result
    else:
        assert result["error"] == "login_required" and result["iss"] == world.issuer, result
        assert "error_description" not in result
