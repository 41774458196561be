"""The test IdP's harness (tests/idp_server.py): a start that never listens is stopped, where
Node was stuck is printed, and the IdP is started again, a bounded number of times."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import idp_server


def test_a_start_that_never_listens_is_retried_and_explained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        idp_server._node()
    except idp_server.IdPUnavailable as exc:
        if os.environ.get("BROKER_TEST_REQUIRE_ALL") == "1":
            pytest.fail(f"Node required (BROKER_TEST_REQUIRE_ALL=1): {exc}")
        pytest.skip(str(exc))
    hanging = tmp_path / "hang.mjs"
    hanging.write_text("function waitForever() { setInterval(() => {}, 1000); }\nwaitForever();\n")
    monkeypatch.setattr(idp_server, "SERVER_SCRIPT", hanging)
    monkeypatch.setattr(idp_server, "START_TIMEOUT", 1.0)
    monkeypatch.setattr(idp_server, "START_ATTEMPTS", 2)
    with (
        pytest.raises(RuntimeError, match=r"did not listen within 1\.0s") as raised,
        idp_server.start_idp([]),
    ):
        pass
    assert "stuck at: JavaScript" in str(raised.value)
    said = capsys.readouterr().err
    assert "attempt 1 of 2" in said and "starting it again" in said
