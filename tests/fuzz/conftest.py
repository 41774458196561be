"""The fuzzing suite's Hypothesis profiles and its world (docs/fuzzing.md).

Profiles, chosen with ``BROKER_FUZZ_PROFILE``:

- ``ci`` (the default, what ``make test`` runs): bounded, and derandomized so that a CI run is
  reproducible; no example database is written.
- ``long``: fifty times the examples, random, with the example database under
  ``tests/artifacts/hypothesis`` so that a failure found once is tried first next time.

Each test asks for a share of the profile's ``max_examples``
(:func:`tests.fuzz.runner.fuzz`). ``deadline`` is off:
an example sends a few real requests and its time depends on the shared machine, not on the
input. ``too_slow`` is suppressed for the same reason (an example sets up a fresh code, refresh
token or pending authorization first, so that the mutation reaches deep code).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

from broker import create_app
from broker.config import parse
from broker.db import Database
from broker.migrate import upgrade
from tests.fakes.github import FakeGitHub
from tests.fuzz.runner import PROFILE, PROFILES
from tests.fuzz.verdict import install_journal
from tests.fuzz.wire import send_wsgi
from tests.fuzz.world import FuzzWorld, cheap_users_file, settings_data

ROOT = Path(__file__).resolve().parents[2]

settings.register_profile(
    "ci",
    max_examples=100,
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "long",
    max_examples=2000,
    derandomize=False,
    database=DirectoryBasedExampleDatabase(str(ROOT / "tests" / "artifacts" / "hypothesis")),
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
if PROFILE not in PROFILES:
    raise pytest.UsageError(f"BROKER_FUZZ_PROFILE must be one of {PROFILES}, not {PROFILE!r}")

ISSUER = "http://127.0.0.1:8000"


@pytest.fixture(scope="session")
def github_fake() -> Iterator[FakeGitHub]:
    with FakeGitHub() as fake:
        yield fake


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory, github_fake: FakeGitHub) -> Iterator[FuzzWorld]:
    """One broker on SQLite for the whole in-process suite, with its clients and signed-in
    users; requests go through the WSGI app with the Flask test client."""
    base = tmp_path_factory.mktemp("fuzz")
    users = base / "users.yaml"
    cheap_users_file(users)
    data = settings_data(ISSUER, f"sqlite:///{base / 'broker.db'}", str(users), github_fake)
    data["instance_path"] = str(base / "instance")
    settings_ = parse(data, env={}, base_dir=str(base), testing=True)
    database = Database(settings_.database_url)
    upgrade(database.engine, client_migrations=settings_.client_migrations)
    install_journal(database.engine)
    database.dispose()
    app = create_app(settings_)
    app.config["TESTING"] = True
    client = app.test_client(use_cookies=False)
    world = FuzzWorld(
        functools.partial(send_wsgi, client), ISSUER, app, github_fake.base_url
    ).setup()
    yield world
    app.extensions["broker"].db.dispose()
    app.extensions["broker"].http.close()
