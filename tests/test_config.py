"""Configuration: ${VAR} expansion, typed settings, one message per problem with its key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.config import ConfigError, load, parse

BASE = {
    "issuer": "https://sso.example.com",
    "secret_key": "k" * 40,
    "providers": {"local": {"users_file": "users.yaml"}},
    "resources": [{"uri": "https://mcp.example.com/jira", "scopes": {"jira:read": "Read"}}],
}


def problems(data: dict[str, object], **kw: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(data, env={}, **kw)  # type: ignore[arg-type]
    return info.value.problems


def test_minimal_config_and_defaults() -> None:
    settings = parse(BASE, env={}, base_dir="/srv/broker")
    assert settings.issuer == "https://sso.example.com"
    assert settings.tokens.signing_alg == "ES256" and settings.tokens.access_ttl == 3600
    assert settings.database_url == "sqlite:////srv/broker/instance/broker.db"
    assert settings.secure_cookies is True
    assert settings.resources[0].scopes == {"jira:read": "Read"}


def test_env_expansion_with_defaults(tmp_path: Path) -> None:
    path = tmp_path / "broker.yaml"
    path.write_text(
        "issuer: ${ISSUER}\n"
        "secret_key: ${SECRET}\n"
        "database_url: ${DB:-postgresql://broker@db/broker}\n"
        "providers: {local: {users_file: users.yaml}}\n"
        "resources: [{uri: 'https://mcp.example.com/${PATH_PART:-jira}'}]\n"
    )
    settings = load(path, env={"ISSUER": "https://sso.example.com", "SECRET": "s" * 40})
    assert settings.database_url == "postgresql+psycopg://broker@db/broker"
    assert settings.resources[0].uri == "https://mcp.example.com/jira"
    assert settings.base_dir == str(tmp_path)


def test_missing_variable_names_the_key_path(tmp_path: Path) -> None:
    path = tmp_path / "broker.yaml"
    path.write_text(
        "issuer: https://sso.example.com\nsecret_key: ${NOPE}\n"
        "providers: {local: {users_file: u.yaml}}\nresources: [{uri: 'https://m.example.com/x'}]\n"
    )
    with pytest.raises(ConfigError) as info:
        load(path, env={})
    assert "secret_key: environment variable NOPE is not set" in info.value.problems


def test_one_message_per_problem_with_key_paths() -> None:
    found = problems(
        {
            "issuer": "http://sso.example.com/",
            "secret_key": "short",
            "tokens": {"access_ttl": "soon", "signing_alg": "HS256", "bogus": 1},
            "providers": {"local": "nope"},
            "resources": [
                {"name": "no uri"},
                {"uri": "https://m.example.com/a#frag", "required_scopes": ["x"]},
            ],
            "rules": [
                {"grant": ["a"], "deny": "b"},
                {"grant": ["a"], "when": {"Planet!": ["mars"]}},
            ],
            "surprise": True,
        }
    )
    expected = [
        "issuer: must not end with a slash",
        "issuer: plain http is allowed only on a loopback host",
        "secret_key: must be at least 32 characters (use `openssl rand -hex 32`)",
        "tokens.access_ttl: must be an integer",
        "tokens.signing_alg: must be one of ES256, RS256, EdDSA",
        "tokens.bogus: unknown key",
        "providers.local: must be a mapping",
        "resources[0].uri: required",
        "resources[1].uri: must not contain a fragment",
        "resources[1].required_scopes: x is not one of the resource's scopes",
        "rules[0]: needs exactly one of grant or deny",
        "rules[1].when.Planet!: not a fact name (lower-case letters, _)",
        "surprise: unknown key",
    ]
    for message in expected:
        assert message in found, (message, found)


def test_required_top_level_keys() -> None:
    found = problems({})
    assert {
        "issuer: required",
        "secret_key: required",
        "providers: at least one provider is required",
        "resources: at least one resource (MCP server) is required",
    } <= set(found)


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "missing.yaml", env={})
    assert "cannot read" in info.value.problems[0]
    bad = tmp_path / "bad.yaml"
    bad.write_text("issuer: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load(bad, env={})
    assert "not valid YAML at line" in info.value.problems[0]
    # The parser's reason is kept: the README's old example had one brace too many.
    bad.write_text("issuer: x\nproviders:\n  corp: {type: oidc, client_secret: ${S}}}\n")
    with pytest.raises(ConfigError) as info:
        load(bad, env={})
    assert info.value.problems == [
        f"{bad}: not valid YAML at line 3, column 38: "
        "while parsing a flow mapping, expected ',' or '}', but got '{'"
    ]
    with pytest.raises(ConfigError) as info:
        load(None, env={})
    assert "BROKER_CONFIG" in info.value.problems[0]


def test_test_only_keys_are_refused_outside_tests() -> None:
    data = {**BASE, "client_metadata_documents": {"allow_hosts": ["127.0.0.1"]}}
    assert "client_metadata_documents.allow_hosts: unknown key" in problems(data)
    assert "issuer: plain http is allowed only on a loopback host" in problems(
        {**BASE, "issuer": "http://sso.example.com", "allow_insecure_issuer": True}
    )


def test_provider_config_errors_carry_the_provider_path(
    make_settings: object, tmp_path: Path
) -> None:
    from broker import create_app

    settings = parse(
        {
            **BASE,
            "database_url": f"sqlite:///{tmp_path}/b.db",
            "providers": {
                "local": {"users_file": str(tmp_path / "none.yaml"), "colour": "blue"},
                "corp": {"type": "oidc", "issuer": "ftp://x"},
                "mystery": {"type": "saml"},
            },
        },
        env={},
    )
    with pytest.raises(ConfigError) as info:
        create_app(settings, check_schema=False)
    found = info.value.problems
    assert "providers.local.colour: unknown key" in found
    assert "providers.corp.client_id: required" in found
    assert any(p.startswith("providers.corp.issuer:") for p in found)
    assert any(p.startswith("providers.mystery.type: unknown provider type 'saml'") for p in found)


def test_app_refuses_an_old_schema(make_settings: object) -> None:
    from broker import create_app

    settings = make_settings()  # type: ignore[operator]
    with pytest.raises(ConfigError) as info:
        create_app(settings)
    assert "run `broker db upgrade`" in info.value.problems[0]
