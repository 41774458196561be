"""``broker explain``: the decision a sign-in would get, and the rules that made it.

Every case runs the command as an operator does (click's runner, a config file, an identity
file) and checks that its decision is the one the authorization flow reaches for the same
identity and request (:meth:`AuthorizationFlow.entitlement`, over :func:`broker.policy.decide`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from broker import create_app, policy
from broker.cli import main
from broker.config import Settings, load
from broker.explain import ExplainError, explain, identity_from_document, read_identity_file
from broker.flow import IGNORED_SCOPES, AuthorizationFlow
from broker.models import PendingLogin
from providers.contract import Identity
from tests.support import authorize_params, pkce, sign_in_local

JIRA = "https://mcp.acme.com/jira"
WIKI = "https://mcp.acme.com/wiki"
CONTRACTORS = "Contractors have no MCP access"

RULES: list[dict[str, Any]] = [
    {"deny": CONTRACTORS, "when": {"groups": ["contractors"]}},
    {"grant": ["jira:read"], "when": {"email_domain": ["acme.com", "example.com"]}},
    {"grant": ["jira:write"], "when": {"provider": ["github"], "teams": ["acme/platform"]}},
    {"grant": ["wiki:read"], "when": {"groups": ["staff"]}, "resources": [WIKI]},
]

ALICE = {  # signs in with GitHub, on the platform team
    "provider": "github",
    "subject": 1001,  # numeric, as YAML reads a GitHub id
    "username": "alice",
    "email": "alice@acme.com",
    "email_verified": True,
    "orgs": ["acme"],
    "teams": ["acme/platform"],
}


def write_config(
    tmp_path: Path, users_file: Path, database_url: str | None = None, **changes: Any
) -> Path:
    data: dict[str, Any] = {
        "issuer": "http://127.0.0.1:8000",
        "secret_key": "explain-secret-" + "x" * 40,
        "database_url": database_url or f"sqlite:///{tmp_path / 'unused.db'}",
        "providers": {
            "local": {"users_file": str(users_file)},
            "github": {"client_id": "gh-client", "client_secret": "gh-secret"},
        },
        "resources": [
            {
                "uri": JIRA,
                "name": "Jira tools",
                "scopes": {"jira:read": "Read issues", "jira:write": "Edit issues"},
                "required_scopes": ["jira:read"],
                "providers": ["github", "local"],
            },
            {"uri": WIKI, "name": "Wiki", "scopes": {"wiki:read": "Read"}, "providers": ["local"]},
        ],
        "rules": RULES,
        **changes,
    }
    path = tmp_path / "broker.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def config(tmp_path: Path, users_file: Path) -> Path:
    return write_config(tmp_path, users_file)


def identity_file(tmp_path: Path, name: str = "who.yaml", **changes: Any) -> Path:
    path = tmp_path / name
    data = {**ALICE, **changes}
    path.write_text(json.dumps(data) if name.endswith(".json") else yaml.safe_dump(data))
    return path


def run(config: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["--config", str(config), "explain", *args])


def flow_entitlement(
    settings: Settings, uri: str, identity: Identity, scope: str
) -> tuple[list[str], str | None]:
    """What the authorization flow decides for a sign-in asking ``scope`` of ``uri``."""
    resource = settings.resource(uri)
    assert resource is not None
    flow = AuthorizationFlow(settings, server=None, sealer=None)  # type: ignore[arg-type]
    return flow.entitlement(PendingLogin(scope=scope), resource, identity)


def agrees_with_flow(config: Path, uri: str, who: Path, result: Result, scope: str = "") -> None:
    """The command's decision is the flow's, and the rules' entitled scopes are policy's."""
    settings = load(str(config))
    identity = read_identity_file(who)
    granted, refused = flow_entitlement(settings, uri, identity, scope)
    shown = json.loads(result.output)
    assert (shown["scopes"], shown["refused"]) == (granted, refused)
    resource = settings.resource(uri)
    assert resource is not None
    decision = policy.decide(settings, resource, identity)
    assert (set(shown["entitled"]), shown["denied"]) == (set(decision.scopes), decision.denied)
    assert result.exit_code == (0 if refused is None else 1)


# -- decisions ---------------------------------------------------------------------------------


def test_allowed_with_the_scopes_the_rules_grant(tmp_path: Path, config: Path) -> None:
    who = identity_file(tmp_path)
    result = run(config, "--identity", str(who), "--resource", JIRA)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "decision:  allowed: jira:read jira:write" in lines
    assert "rules[1]  grant jira:read" in result.output
    assert "email_domain: acme.com in identity email_domain [acme.com]" in result.output
    assert "matched: grants jira:write" in result.output
    agrees_with_flow(
        config, JIRA, who, run(config, "--identity", str(who), "--resource", JIRA, "--json")
    )


def test_a_scope_not_granted_names_the_rule_and_the_failed_condition(
    tmp_path: Path, config: Path
) -> None:
    who = identity_file(tmp_path, teams=["acme/web"])
    result = run(config, "--identity", str(who), "--resource", JIRA, "--scope", "jira:write")
    assert result.exit_code == 0, result.output
    # The flow adds the required scope and drops what the rules do not entitle.
    assert "decision:  allowed: jira:read" in result.output
    assert "not granted: jira:write (rules[2] would grant it and did not match)" in result.output
    assert "teams: none of [acme/platform] in identity teams [acme/web]" in result.output
    as_json = run(
        config, "--identity", str(who), "--resource", JIRA, "--scope", "jira:write", "--json"
    )
    agrees_with_flow(config, JIRA, who, as_json, scope="jira:write")
    assert json.loads(as_json.output)["not_granted"] == {"jira:write": ["rules[2]"]}


def test_denied_by_a_deny_rule(tmp_path: Path, config: Path) -> None:
    who = identity_file(
        tmp_path,
        provider="local",
        subject="carol",
        teams=[],
        orgs=[],
        groups=["contractors"],
    )
    result = run(config, "--identity", str(who), "--resource", JIRA)
    assert result.exit_code == 1, result.output
    assert f"decision:  refused: {CONTRACTORS}" in result.output
    assert "groups: contractors in identity groups [contractors]" in result.output
    assert "not read: rules[0] denied first (would match)" in result.output  # her email grant
    shown = json.loads(run(config, "--identity", str(who), "--resource", JIRA, "--json").output)
    assert shown["rules"][0]["matched"] and shown["rules"][1]["denied_by"] == "rules[0]"
    agrees_with_flow(
        config, JIRA, who, run(config, "--identity", str(who), "--resource", JIRA, "--json")
    )


def test_refused_without_a_required_scope(tmp_path: Path, config: Path) -> None:
    who = identity_file(tmp_path, email="alice@elsewhere.example")  # jira:write, not jira:read
    result = run(config, "--identity", str(who), "--resource", JIRA)
    assert result.exit_code == 1, result.output
    assert f"decision:  refused: {policy.REQUIRED_NOT_ENTITLED}" in result.output
    assert "required:  jira:read (not entitled: jira:read)" in result.output
    assert "entitled:  jira:write" in result.output
    agrees_with_flow(
        config, JIRA, who, run(config, "--identity", str(who), "--resource", JIRA, "--json")
    )


def test_an_unverified_email_is_the_reason_the_user_sees(tmp_path: Path, config: Path) -> None:
    who = identity_file(tmp_path, email_verified=False, teams=[])
    result = run(config, "--identity", str(who), "--resource", JIRA)
    assert result.exit_code == 1, result.output
    assert f"decision:  refused: {policy.UNVERIFIED_EMAIL}" in result.output
    assert (
        "email_domain: none of [acme.com, example.com] in identity email_domain [] "
        "(the email alice@acme.com is not verified, so no rule sees it)"
    ) in result.output
    agrees_with_flow(
        config, JIRA, who, run(config, "--identity", str(who), "--resource", JIRA, "--json")
    )


def test_a_rule_for_other_resources_is_not_read(tmp_path: Path, config: Path) -> None:
    who = identity_file(
        tmp_path, provider="local", subject="bob", teams=[], orgs=[], groups=["staff"]
    )
    on_jira = json.loads(run(config, "--identity", str(who), "--resource", JIRA, "--json").output)
    wiki_rule = on_jira["rules"][3]
    assert (wiki_rule["applies"], wiki_rule["read"]) == (False, False)
    assert wiki_rule["outcome"] == f"not for this resource (only for: {WIKI})"
    assert on_jira["scopes"] == ["jira:read"]
    on_wiki = run(config, "--identity", str(who), "--resource", WIKI)
    assert on_wiki.exit_code == 0, on_wiki.output
    assert "matched: grants wiki:read" in on_wiki.output
    agrees_with_flow(
        config, WIKI, who, run(config, "--identity", str(who), "--resource", WIKI, "--json")
    )


def test_a_provider_not_allowed_for_the_resource(tmp_path: Path, config: Path) -> None:
    who = identity_file(tmp_path)  # GitHub; the wiki takes local sign-ins only
    result = run(config, "--identity", str(who), "--resource", WIKI)
    assert result.exit_code == 1, result.output
    assert f"decision:  refused: {policy.PROVIDER_NOT_ALLOWED}" in result.output
    assert (
        "provider:  github: not allowed for this resource (resources[1].providers: local)"
        in result.output
    )
    shown = json.loads(run(config, "--identity", str(who), "--resource", WIKI, "--json").output)
    assert shown["provider"] == {
        "name": "github",
        "allowed": False,
        "allowed_providers": ["local"],
        "configured": True,
    }
    assert not any(rule["read"] for rule in shown["rules"])
    agrees_with_flow(
        config, WIKI, who, run(config, "--identity", str(who), "--resource", WIKI, "--json")
    )


def test_scopes_repeated_or_space_separated_and_oidc_scopes_ignored(
    tmp_path: Path, config: Path
) -> None:
    who = identity_file(tmp_path)
    args = ["--identity", str(who), "--resource", JIRA, "--json"]
    one = run(config, *args, "--scope", "openid jira:write", "--scope", "jira:read")
    shown = json.loads(one.output)
    assert shown["asked"] == ["jira:write", "jira:read"]
    assert shown["scopes"] == ["jira:write", "jira:read"]
    agrees_with_flow(config, JIRA, who, one, scope="openid jira:write jira:read")


def test_without_rules_every_scope_is_entitled(tmp_path: Path, users_file: Path) -> None:
    config = write_config(tmp_path, users_file, rules=[])
    who = identity_file(tmp_path)
    result = run(config, "--identity", str(who), "--resource", JIRA)
    assert result.exit_code == 0, result.output
    assert "rules:     (none)" in result.output
    assert "no rule applies to this resource" in result.output
    agrees_with_flow(
        config, JIRA, who, run(config, "--identity", str(who), "--resource", JIRA, "--json")
    )


@pytest.mark.parametrize(
    ("changes", "uri", "scope"),
    [
        ({}, JIRA, ""),
        ({}, JIRA, "jira:write"),
        ({}, JIRA, "nonsense jira:write"),
        ({"teams": []}, JIRA, "jira:write"),
        ({"email_verified": False}, JIRA, ""),
        ({"email": "ALICE@ACME.COM", "teams": ["ACME/Platform"]}, JIRA, ""),
        ({"email_verified": False, "teams": []}, JIRA, ""),
        ({"provider": "local", "teams": [], "orgs": [], "groups": ["staff"]}, WIKI, ""),
        ({"provider": "local", "teams": [], "orgs": [], "groups": ["Contractors"]}, WIKI, ""),
        ({}, WIKI, ""),
    ],
)
def test_the_decision_is_the_flows(
    tmp_path: Path, config: Path, changes: dict[str, Any], uri: str, scope: str
) -> None:
    who = identity_file(tmp_path, **changes)
    result = run(config, "--identity", str(who), "--resource", uri, "--scope", scope, "--json")
    assert result.exit_code in (0, 1), result.output
    agrees_with_flow(config, uri, who, result, scope=scope)


def test_the_trace_reaches_the_decision_policy_reaches(config: Path) -> None:
    """The rules as traced add up to :func:`policy.decide`'s scopes and deny."""
    settings = load(str(config))
    for resource in settings.resources:
        for groups in ((), ("staff",), ("contractors",)):
            for provider in ("github", "local"):
                identity = Identity(
                    provider=provider,
                    subject="s",
                    email="a@acme.com",
                    email_verified=True,
                    groups=groups,
                    teams=("acme/platform",),
                )
                e = explain(settings, resource, identity)
                denies = [t for t in e.rules if t.read and t.matched and t.rule.kind == "deny"]
                grants = {s for t in e.rules if t.read and t.matched for s in t.grants}
                decision = policy.decide(settings, resource, identity)
                if decision.denied is None:
                    assert not denies and grants == decision.scopes
                elif e.provider_allowed:
                    assert denies[0].rule.reason == decision.denied


def test_the_ignored_scopes_are_the_flows() -> None:
    assert policy.IGNORED_SCOPES == IGNORED_SCOPES


# -- output ------------------------------------------------------------------------------------


def test_json_shape(tmp_path: Path, config: Path) -> None:
    who = identity_file(tmp_path, raw={"upstream": "server-only"}, extra_facts={})
    shown = json.loads(run(config, "--identity", str(who), "--resource", JIRA, "--json").output)
    assert set(shown) == {
        "allowed",
        "refused",
        "scopes",
        "asked",
        "entitled",
        "denied",
        "not_granted",
        "required_scopes",
        "missing_required",
        "identity",
        "resource",
        "provider",
        "rules",
        "notes",
    }
    assert shown["allowed"] is True and shown["required_scopes"] == ["jira:read"]
    assert shown["resource"] == {"uri": JIRA, "name": "Jira tools", "path": "resources[0]"}
    assert shown["identity"]["subject"] == "1001" and "raw" not in shown["identity"]
    assert "server-only" not in json.dumps(shown)
    assert [rule["path"] for rule in shown["rules"]] == [f"rules[{i}]" for i in range(4)]
    rule = shown["rules"][2]
    assert set(rule) == {
        "index",
        "path",
        "kind",
        "scopes",
        "reason",
        "resources",
        "applies",
        "read",
        "matched",
        "denied_by",
        "grants",
        "outcome",
        "conditions",
        "failed",
    }
    assert rule["conditions"][1] == {
        "fact": "teams",
        "wanted": ["acme/platform"],
        "have": ["acme/platform"],
        "holds": True,
        "note": None,
    }


def test_a_json_identity_file_and_extra_facts(tmp_path: Path, users_file: Path) -> None:
    """A provider's own facts (Keycloak's ``client_roles``) go under ``extra_facts``."""
    config = write_config(
        tmp_path,
        users_file,
        providers={
            "local": {"users_file": str(users_file)},
            "keycloak": {
                "server_url": "https://kc.example.com",
                "realm": "staff",
                "client_id": "kc",
                "client_secret": "kc-secret",
            },
        },
        resources=[{"uri": JIRA, "scopes": {"jira:read": "Read"}}],
        rules=[{"grant": ["jira:read"], "when": {"client_roles": ["jira-user"]}}],
    )
    base = {"provider": "keycloak", "teams": [], "orgs": []}
    who = identity_file(tmp_path, "who.json", **base, extra_facts={"client_roles": ["jira-user"]})
    result = run(config, "--identity", str(who), "--resource", JIRA)
    assert result.exit_code == 0, result.output
    assert "client_roles: jira-user in identity client_roles [jira-user]" in result.output
    other = identity_file(tmp_path, "other.json", **base, extra_facts={"client_roles": ["x"]})
    refused = run(config, "--identity", str(other), "--resource", JIRA)
    assert refused.exit_code == 1
    assert f"decision:  refused: {policy.NOT_ENTITLED}" in refused.output


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("who.yaml", "provider: [github\n", "not YAML: "),
        ("who.json", '{"provider": ', "not JSON: Expecting value (line 1)"),
        ("who.yaml", "- github\n- 1001\n", "must be a mapping of identity facts"),
        ("who.yaml", "", "not empty"),
        ("who.yaml", "provider: github\nsubject: '1'\nteam: [a]\n", "team: unknown key"),
        ("who.yaml", "subject: '1'\n", "provider: required"),
        ("who.yaml", "provider: github\n", "subject: required"),
        ("who.yaml", "provider: github\nsubject: '1'\nteams: acme/web\n", "teams: must be a list"),
        (
            "who.yaml",
            "provider: github\nsubject: '1'\nemail_verified: 'yes'\n",
            "email_verified: must be true or false",
        ),
        (
            "who.yaml",
            "provider: github\nsubject: '1'\nemail_domain: acme.com\n",
            "email_domain: is derived from email",
        ),
        (
            "who.yaml",
            "provider: github\nsubject: '1'\nextra_facts: {email: [x@acme.com]}\n",
            "extra_facts.email: is a built-in fact",
        ),
        (
            "who.yaml",
            "provider: github\nsubject: '1'\nextra_facts: {Clearance: [x]}\n",
            "extra_facts.Clearance: not a fact name",
        ),
        (
            "who.yaml",
            "provider: gitlab\nsubject: '1'\n",
            "provider: gitlab is not a configured provider (configured: github, local)",
        ),
        (
            "who.yaml",
            "provider: local\nsubject: bob\nteams: [acme/web]\n",
            "teams: provider local does not yield this fact",
        ),
        (
            "who.yaml",
            "provider: github\nsubject: '1'\nextra_facts: {clearance: [x]}\n",
            "extra_facts.clearance: provider github does not yield this fact",
        ),
    ],
)
def test_a_bad_identity_file_is_one_line_and_exit_2(
    tmp_path: Path, config: Path, name: str, content: str, problem: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    result = run(config, "--identity", str(path), "--resource", JIRA)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    if problem == "not empty":
        assert "must be a mapping of identity facts" in lines[0] and "not empty" in lines[0]
    else:
        assert problem in lines[0]
    assert lines[0].startswith(f"broker explain: {path}: ")


def test_a_missing_identity_file(tmp_path: Path, config: Path) -> None:
    result = run(config, "--identity", str(tmp_path / "nobody.yaml"), "--resource", JIRA)
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"broker explain: {tmp_path / 'nobody.yaml'}: cannot read it: No such file or directory"
    )


def test_every_problem_of_a_file_is_listed() -> None:
    with pytest.raises(ExplainError) as caught:
        identity_from_document({"provider": 3, "groups": "staff", "colour": "blue"})
    assert len(caught.value.problems) == 4


def test_an_unknown_resource_lists_the_configured_ones(tmp_path: Path, config: Path) -> None:
    who = identity_file(tmp_path)
    result = run(config, "--identity", str(who), "--resource", "https://mcp.acme.com/jira/")
    assert result.exit_code == 2
    assert result.output.strip() == (
        "broker explain: --resource https://mcp.acme.com/jira/: not a configured resource "
        f"(configured: {JIRA}, {WIKI})"
    )


def test_usage_errors_exit_2(tmp_path: Path, config: Path) -> None:
    who = identity_file(tmp_path)
    neither = run(config, "--resource", JIRA)
    assert (
        neither.exit_code == 2 and "exactly one of --identity FILE and --user REF" in neither.output
    )
    both = run(config, "--identity", str(who), "--user", "alice", "--resource", JIRA)
    assert both.exit_code == 2
    assert run(config, "--identity", str(who)).exit_code == 2  # no --resource


def test_a_bad_config_exits_2(tmp_path: Path, users_file: Path) -> None:
    config = write_config(
        tmp_path, users_file, rules=[{"grant": ["jira:read"], "when": {"clearance": ["x"]}}]
    )
    result = run(config, "--identity", str(identity_file(tmp_path)), "--resource", JIRA)
    assert result.exit_code == 2
    assert "broker: invalid configuration" in result.output
    assert "rules[0].when.clearance" in result.output


def test_explain_needs_no_database(tmp_path: Path, config: Path) -> None:
    run(config, "--identity", str(identity_file(tmp_path)), "--resource", JIRA)
    assert not (tmp_path / "unused.db").exists()


# -- a stored identity -------------------------------------------------------------------------


def test_a_signed_in_user_by_reference(tmp_path: Path, users_file: Path, database_url: str) -> None:
    config = write_config(tmp_path, users_file, database_url)
    assert CliRunner().invoke(main, ["--config", str(config), "db", "upgrade"]).exit_code == 0
    app = create_app(str(config))
    app.config["TESTING"] = True
    try:
        client = app.test_client()
        registered = client.post(
            "/register",
            json={
                "redirect_uris": ["http://127.0.0.1:5555/callback"],
                "token_endpoint_auth_method": "none",
            },
        ).json
        _, challenge = pkce()
        params = authorize_params(
            registered["client_id"], challenge, resource=JIRA, scope="jira:read jira:write"
        )
        done = sign_in_local(client, params)
        assert done.status_code == 302 and "code=" in done.headers["Location"], done.text
    finally:
        app.extensions["broker"].db.dispose()
        app.extensions["broker"].http.close()

    result = run(config, "--user", "alice@example.com", "--resource", JIRA, "--scope", "jira:write")
    assert result.exit_code == 0, result.output
    assert "identity:  local:alice" in result.output
    assert "decision:  allowed: jira:read" in result.output
    assert "not granted: jira:write (rules[2] would grant it and did not match)" in result.output
    assert "the stored identity of user usr_" in result.output
    shown = json.loads(run(config, "--user", "local:alice", "--resource", JIRA, "--json").output)
    assert shown["identity"]["provider"] == "local" and shown["identity"]["groups"] == ["staff"]
    assert shown["scopes"] == ["jira:read"]

    disabled = CliRunner().invoke(
        main, ["--config", str(config), "users", "disable", "local:alice"]
    )
    assert disabled.exit_code == 0, disabled.output
    after = run(config, "--user", "local:alice", "--resource", JIRA)
    assert "is disabled: its refreshes and broker sessions are refused" in after.output

    nobody = run(config, "--user", "nobody@example.com", "--resource", JIRA)
    assert nobody.exit_code == 2
    assert nobody.output.startswith("broker explain: nobody@example.com: no such user")
