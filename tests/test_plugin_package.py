"""A third-party provider plugin as a real, installed package.

``tests/plugin_example`` (the worked example of ``docs/plugins.md``) is installed with pip into a
temporary directory. A broker in a subprocess whose ``PYTHONPATH`` adds that directory finds the
plugin through its ``broker.providers`` entry point (``importlib.metadata``, as in production;
the test venv is not touched) and signs users in through it: consent, the redirect to a fake Acme
upstream (``pytest-httpserver`` in this process, real HTTP), the callback, the code and the token
with PKCE. A rule on the plugin's own fact decides the scopes; a rule on a fact the plugin does not
declare, or a bad provider configuration, stops start-up with key paths.

The subprocess runs this file as a script (``main``): the broker and the plugin are imported there
only, never in the pytest process.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest
import yaml
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from tests.support import unavailable

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "tests" / "plugin_example"
DOCS = ROOT / "docs" / "plugins.md"

ISSUER = "http://127.0.0.1:8000"
CALLBACK = f"{ISSUER}/callback/acme"
CLIENT_ID = "broker-at-acme"
CLIENT_SECRET = "acme-secret-0f3b9c51"
RESOURCE = "http://127.0.0.1:8001/mcp"  # tests.support.RESOURCE, the resource of authorize_params
PIP_TIMEOUT = 300
BROKER_TIMEOUT = 120


# -- the fake Acme Identity ------------------------------------------------------------------


@dataclass(frozen=True)
class AcmeUser:
    id: int
    login: str
    name: str
    email: str
    groups: tuple[str, ...]
    clearance: tuple[str, ...]


USERS = {
    "alice": AcmeUser(4711, "alice", "Alice Acme", "alice@acme.example", ("staff",), ("secret",)),
    "bob": AcmeUser(4712, "bob", "Bob Acme", "bob@acme.example", ("staff",), ("public",)),
}


@dataclass(frozen=True)
class AcmeGrant:
    user: AcmeUser
    challenge: str
    redirect_uri: str
    scope: tuple[str, ...]


def _json(body: Mapping[str, Any], status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json")


class FakeAcme:
    """Acme Identity over real HTTP, as the example plugin expects it.

    - ``GET /oauth/authorize`` signs in the user named by the browser's ``acme_session`` cookie
      (the browser is already signed in at Acme) and redirects to the registered callback with a
      code; it requires a PKCE ``S256`` challenge.
    - ``POST /oauth/token`` takes the client's HTTP Basic credentials, redeems a code once, checks
      ``redirect_uri`` and the PKCE verifier; errors as RFC 6749 section 5.2 says.
    - ``GET /api/me`` answers the user behind a bearer token; ``clearance`` only when the token
      carries the ``clearance`` scope.
    """

    def __init__(self, server: HTTPServer) -> None:
        self.server = server
        self.codes: dict[str, AcmeGrant] = {}
        self.tokens: dict[str, AcmeGrant] = {}
        self.authorize_requests: list[dict[str, str]] = []
        self.refused: list[str] = []
        server.expect_request("/oauth/authorize", method="GET").respond_with_handler(self.authorize)
        server.expect_request("/oauth/token", method="POST").respond_with_handler(self.token)
        server.expect_request("/api/me", method="GET").respond_with_handler(self.me)

    @property
    def base_url(self) -> str:
        return self.server.url_for("/").rstrip("/")

    def authorize(self, request: Request) -> Response:
        args = request.args.to_dict()
        self.authorize_requests.append(args)
        if args.get("client_id") != CLIENT_ID or args.get("redirect_uri") != CALLBACK:
            self.refused.append("authorize: unknown client or redirect_uri")
            return Response("unknown client or redirect_uri", status=400)
        if (
            args.get("response_type") != "code"
            or args.get("code_challenge_method") != "S256"
            or not args.get("code_challenge")
            or not args.get("state")
        ):
            self.refused.append("authorize: not a code request with PKCE S256 and state")
            query = urlencode({"error": "invalid_request", "state": args.get("state", "")})
            return Response(status=302, headers={"Location": f"{CALLBACK}?{query}"})
        user = USERS.get(request.cookies.get("acme_session", ""))
        if user is None:
            self.refused.append("authorize: no Acme session")
            return Response("sign in at Acme first", status=401)
        code = secrets.token_urlsafe(16)
        self.codes[code] = AcmeGrant(
            user, args["code_challenge"], CALLBACK, tuple(args.get("scope", "").split())
        )
        query = urlencode({"code": code, "state": args["state"]})
        return Response(status=302, headers={"Location": f"{CALLBACK}?{query}"})

    def token(self, request: Request) -> Response:
        auth = request.authorization
        if (
            auth is None
            or auth.type != "basic"
            or (auth.username, auth.password)
            != (
                CLIENT_ID,
                CLIENT_SECRET,
            )
        ):
            self.refused.append("token: bad client authentication")
            return _json({"error": "invalid_client"}, 401)
        form = request.form
        if form.get("grant_type") != "authorization_code":
            self.refused.append("token: not an authorization_code grant")
            return _json({"error": "unsupported_grant_type"}, 400)
        grant = self.codes.pop(form.get("code", ""), None)
        verifier = form.get("code_verifier", "")
        challenge = (
            base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
            .rstrip(b"=")
            .decode()
        )
        if grant is None or form.get("redirect_uri") != grant.redirect_uri:
            self.refused.append("token: unknown code or redirect_uri mismatch")
            return _json({"error": "invalid_grant"}, 400)
        if challenge != grant.challenge:
            self.refused.append("token: PKCE verifier does not match")
            return _json({"error": "invalid_grant"}, 400)
        token = secrets.token_urlsafe(24)
        self.tokens[token] = grant
        return _json(
            {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": 3600,
                "scope": " ".join(grant.scope),
            }
        )

    def me(self, request: Request) -> Response:
        header = request.headers.get("Authorization", "")
        grant = self.tokens.get(header[len("Bearer ") :]) if header.startswith("Bearer ") else None
        if grant is None:
            self.refused.append("me: no valid bearer token")
            return _json({"error": "invalid_token"}, 401)
        user = grant.user
        body: dict[str, Any] = {
            "id": user.id,
            "login": user.login,
            "name": user.name,
            "email": user.email,
            "email_verified": True,
            "groups": list(user.groups),
        }
        if "clearance" in grant.scope:
            body["clearance"] = list(user.clearance)
        return _json(body)


# -- running pip and the broker --------------------------------------------------------------


def _text(output: str | bytes | None) -> str:
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""


def _run(
    args: list[str], *, timeout: float, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            args, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"timed out after {timeout:g}s: {' '.join(args)}\n"
            f"--- stdout ---\n{_text(exc.stdout)}\n--- stderr ---\n{_text(exc.stderr)}"
        )


def _output(result: subprocess.CompletedProcess[str]) -> str:
    return f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"


def _setuptools_builds_wheels() -> bool:
    """Whether the venv's setuptools builds wheels by itself (70.1 or later) or with ``wheel``,
    which an offline ``--no-build-isolation`` install needs."""
    if importlib.util.find_spec("wheel") is not None:
        return True
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return False
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2]) >= (70, 1)


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tests/plugin_example`` installed by pip into a directory of its own.

    Offline (``--no-index --no-build-isolation``) when the venv's setuptools can build the wheel;
    otherwise with pip's build isolation, which takes setuptools from pip's configured index (no
    index: skipped, or failed under ``BROKER_TEST_REQUIRE_ALL=1``). The source is copied first:
    setuptools builds in the source tree (``build/``, ``*.egg-info``).
    """
    work = tmp_path_factory.mktemp("acme-plugin")
    source, target = work / "source", work / "site"
    shutil.copytree(
        EXAMPLE, source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info")
    )
    offline = _setuptools_builds_wheels()
    flags = ["--no-index", "--no-build-isolation"] if offline else []
    result = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "--no-input",
            "--quiet",
            *flags,
            "--target",
            str(target),
            str(source),
        ],
        timeout=PIP_TIMEOUT,
    )
    if result.returncode != 0:
        how = "offline" if offline else "with build isolation"
        message = f"pip install {how} of tests/plugin_example: exit {result.returncode}"
        if not offline and "build dependencies" in result.stdout + result.stderr:
            unavailable(
                f"{message}: no setuptools to build with (the venv's setuptools is older than "
                f"70.1 and has no wheel package, and pip's index cannot supply one)\n"
                f"{_output(result)}"
            )
        pytest.fail(f"{message}\n{_output(result)}")
    return target


def broker_config(tmp_path: Path, base_url: str, **overrides: Any) -> dict[str, Any]:
    """A ``broker.yaml`` mapping with the plugin's provider as the only sign-in method."""
    config: dict[str, Any] = {
        "issuer": ISSUER,
        "secret_key": "test-secret-" + "x" * 40,
        "database_url": f"sqlite:///{tmp_path / 'broker.db'}",
        "instance_path": str(tmp_path / "instance"),
        "providers": {
            "acme": {
                "base_url": base_url,
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
            }
        },
        "resources": [
            {
                "uri": RESOURCE,
                "name": "Demo tools",
                "scopes": {"demo:read": "Read demo data", "demo:write": "Change demo data"},
                "required_scopes": ["demo:read"],
            }
        ],
    }
    config.update(overrides)
    return config


def run_broker(
    site: Path, tmp_path: Path, job: Mapping[str, Any], *, upstream: FakeAcme | None = None
) -> dict[str, Any]:
    """Run ``main`` in a subprocess that sees the installed plugin; returns its report. On
    failure, the subprocess's output and what the fake upstream refused."""
    job_file, report_file = tmp_path / "job.json", tmp_path / "report.json"
    job_file.write_text(json.dumps({"base_dir": str(tmp_path), **job}))
    env = {key: value for key, value in os.environ.items() if not key.startswith("BROKER_")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT)])
    # -P: the script's directory (tests/) is not put on sys.path; -W error as pytest runs.
    args = [sys.executable, "-P", "-W", "error", __file__, str(job_file), str(report_file)]
    result = _run(args, timeout=BROKER_TIMEOUT, env=env)
    if result.returncode != 0 or not report_file.exists():
        refused = f"\n--- the fake Acme refused ---\n{upstream.refused}" if upstream else ""
        pytest.fail(
            f"the broker subprocess failed (exit {result.returncode})\n{_output(result)}{refused}"
        )
    report: dict[str, Any] = json.loads(report_file.read_text())
    return report


# -- the tests -------------------------------------------------------------------------------


def test_sign_in_through_the_installed_plugin_with_a_rule_on_its_own_fact(
    plugin_site: Path, httpserver: HTTPServer, tmp_path: Path
) -> None:
    acme = FakeAcme(httpserver)
    rules = [
        {"grant": ["demo:read", "demo:write"], "when": {"clearance": ["secret"]}},
        {"grant": ["demo:read"], "when": {"provider": ["acme"]}},
    ]
    config = broker_config(tmp_path, acme.base_url, rules=rules)
    job = {"mode": "login", "config": config, "users": ["alice", "bob"]}
    report = run_broker(plugin_site, tmp_path, job, upstream=acme)
    httpserver.check_assertions()
    httpserver.check_handler_errors()

    # Found through the entry point of the installed distribution, imported from the install.
    assert report["plugin"] == {
        "name": "acme",
        "file": str(plugin_site / "acme_broker_provider.py"),
        "distribution": "acme-broker-provider",
    }
    assert "acme" in report["provider_types"]

    alice, bob = report["logins"]["alice"], report["logins"]["bob"]
    assert acme.refused == []
    for login in (alice, bob):
        assert login["consent_offers_acme"], login
        assert login["upstream"] == f"{acme.base_url}/oauth/authorize"
        assert login["redirect_uri"] == CALLBACK
        assert login["token_type"] == "Bearer"
    # The rule on the plugin's fact decided: alice's clearance is secret, bob's is not.
    assert set(alice["scope"].split()) == {"demo:read", "demo:write"}
    assert set(alice["access_token_scope"].split()) == {"demo:read", "demo:write"}
    assert set(bob["scope"].split()) == {"demo:read"}
    assert set(bob["access_token_scope"].split()) == {"demo:read"}
    # A rule reads clearance, so the broker told the provider (apply_requirements) and it asked
    # Acme for the clearance scope; every code was redeemed, once.
    assert len(acme.authorize_requests) == 2
    for request in acme.authorize_requests:
        assert request["scope"].split() == ["profile", "clearance"]
    assert acme.codes == {} and len(acme.tokens) == 2


def test_a_rule_on_a_fact_the_plugin_does_not_declare_stops_start_up(
    plugin_site: Path, tmp_path: Path
) -> None:
    rules = [{"grant": ["demo:read"], "when": {"teams": ["acme/platform"]}}]
    config = broker_config(tmp_path, "http://127.0.0.1:9", rules=rules)
    report = run_broker(plugin_site, tmp_path, {"mode": "startup", "config": config})
    assert report["error"] == "ConfigError"
    [problem] = report["problems"]
    assert problem.startswith("rules[0].when.teams: no provider this rule applies to (acme) ")
    assert "'teams'" in problem
    # The facts offered are the plugin's: the base facts, groups and its own clearance.
    offered = re.search(r"\(they yield: ([^)]*)\)", problem)
    assert offered, problem
    assert set(offered.group(1).split(", ")) == {
        "provider",
        "subject",
        "username",
        "name",
        "email",
        "email_domain",
        "email_verified",
        "groups",
        "clearance",
    }


def test_the_plugins_configuration_problems_carry_key_paths(
    plugin_site: Path, tmp_path: Path
) -> None:
    config = broker_config(tmp_path, "http://127.0.0.1:9")
    config["providers"]["acme"] = {
        "base_url": "http://login.acme.example",
        "client_id": CLIENT_ID,
        "colour": "blue",
    }
    report = run_broker(plugin_site, tmp_path, {"mode": "startup", "config": config})
    assert report["error"] == "ConfigError"
    assert sorted(report["problems"]) == [
        "providers.acme.base_url: must be an https URL (http allowed only for loopback hosts)",
        "providers.acme.client_secret: required",
        "providers.acme.colour: unknown key",
    ]


def test_the_guide_shows_the_example_package_and_its_examples_parse() -> None:
    text = DOCS.read_text(encoding="utf-8")
    blocks = re.findall(r"^```(\w*)\n(.*?)^```$", text, flags=re.M | re.S)
    assert blocks
    by_language: dict[str, list[str]] = {}
    for language, body in blocks:
        by_language.setdefault(language, []).append(body)
        if language == "python":
            compile(body, "docs/plugins.md", "exec")
        elif language == "yaml":
            yaml.safe_load(body)
        elif language == "toml":
            tomllib.loads(body)
    module = (EXAMPLE / "acme_broker_provider.py").read_text(encoding="utf-8")
    pyproject = (EXAMPLE / "pyproject.toml").read_text(encoding="utf-8")
    assert module in by_language["python"], "docs/plugins.md must show the example module as is"
    assert pyproject in by_language["toml"], "docs/plugins.md must show its pyproject.toml as is"


# -- the subprocess: a broker that finds the plugin by its entry point -----------------------


def _sign_in(app: Any, user: str) -> dict[str, Any]:
    """Play a browser signed in at Acme as ``user`` through consent, Acme and the callback, then
    the MCP client redeeming the code with PKCE."""
    import httpx
    import jwt

    from tests.support import approve, authorize_params, pkce, query, redeem

    client = app.test_client()
    registered = client.post(
        "/register",
        json={"redirect_uris": ["http://127.0.0.1/callback"], "token_endpoint_auth_method": "none"},
    )
    assert registered.status_code == 201, ("register", registered.status_code, registered.text)
    client_id = registered.json["client_id"]
    verifier, challenge = pkce()
    params = authorize_params(client_id, challenge, scope="demo:read demo:write")
    authorized = client.get("/authorize", query_string=params)
    assert authorized.status_code == 302, ("authorize", authorized.status_code, authorized.text)
    consent = client.get(authorized.headers["Location"])
    assert consent.status_code == 200, ("consent", consent.status_code, consent.text[:500])
    approved = approve(client, consent, "acme")
    assert approved.status_code == 302, ("approve", approved.status_code, approved.text[:500])
    to_acme = approved.headers["Location"]
    with httpx.Client(
        cookies={"acme_session": user}, follow_redirects=False, timeout=10
    ) as browser:
        at_acme = browser.get(to_acme)
    assert at_acme.status_code == 302, ("acme authorize", at_acme.status_code, at_acme.text)
    back = urlsplit(at_acme.headers["location"])
    callback = client.get(back.path, query_string=back.query)
    assert callback.status_code == 302, ("callback", callback.status_code, callback.text[:500])
    result = query(callback.headers["Location"])
    assert "code" in result, ("callback", callback.headers["Location"])
    token = redeem(client, client_id, result["code"], verifier)
    assert token.status_code == 200, ("token", token.status_code, token.text)
    body = token.json
    jwks = jwt.PyJWKSet.from_dict(client.get("/jwks.json").json)
    header = jwt.get_unverified_header(body["access_token"])
    claims = jwt.decode(
        body["access_token"],
        key=jwks[header["kid"]],
        algorithms=[header["alg"]],
        audience=RESOURCE,
        issuer=ISSUER,
    )
    upstream = urlsplit(to_acme)
    return {
        "consent_offers_acme": 'value="acme"' in consent.text and "Acme" in consent.text,
        "upstream": f"{upstream.scheme}://{upstream.netloc}{upstream.path}",
        "redirect_uri": query(to_acme).get("redirect_uri"),
        "token_type": body.get("token_type"),
        "scope": body.get("scope", ""),
        "access_token_scope": claims.get("scope", ""),
    }


def _login_job(job: Mapping[str, Any]) -> dict[str, Any]:
    from broker import create_app
    from broker.config import parse
    from broker.db import Database
    from broker.migrate import upgrade
    from broker.plugins import plugin_manager, provider_types

    pm = plugin_manager()  # the built-ins, then the broker.providers entry points
    plugin = pm.get_plugin("acme")
    assert plugin is not None, "no plugin registered under the entry point name acme"
    [distribution] = [dist for found, dist in pm.list_plugin_distinfo() if found is plugin]
    report: dict[str, Any] = {
        "plugin": {
            "name": pm.get_name(plugin),
            "file": plugin.__file__,
            "distribution": distribution.project_name,
        },
        "provider_types": sorted(provider_types(pm)),
    }
    settings = parse(job["config"], env={}, base_dir=job["base_dir"], testing=True)
    database = Database(settings.database_url)
    upgrade(database.engine)
    database.dispose()
    app = create_app(settings)
    try:
        report["logins"] = {user: _sign_in(app, user) for user in job["users"]}
    finally:
        app.extensions["broker"].db.dispose()
        app.extensions["broker"].http.close()
    return report


def _startup_job(job: Mapping[str, Any]) -> dict[str, Any]:
    from broker import create_app
    from broker.config import ConfigError, parse
    from broker.db import Database
    from broker.migrate import upgrade

    settings = parse(job["config"], env={}, base_dir=job["base_dir"], testing=True)
    database = Database(settings.database_url)
    upgrade(database.engine)
    database.dispose()
    try:
        app = create_app(settings)
    except ConfigError as exc:
        return {"error": "ConfigError", "problems": list(exc.problems)}
    app.extensions["broker"].db.dispose()
    app.extensions["broker"].http.close()
    return {"error": None, "problems": []}


def main(job_file: str, report_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    run = {"login": _login_job, "startup": _startup_job}[job["mode"]]
    Path(report_file).write_text(json.dumps(run(job)))


if __name__ == "__main__":
    main(*sys.argv[1:])
