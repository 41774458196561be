"""The account page in a real browser: headless Chromium (Debian's package) driven by Playwright.

The same served broker, browser and sign-in steps as ``test_pages.py`` (imported from it): the user
signs in through consent and the login form, opens ``/account``, disconnects one connection and
then all; the client's next refresh proves what was cut. Screenshots go to ``tests/artifacts/``.
"""

from __future__ import annotations

from typing import Any

from tests.pages.test_pages import (  # noqa: F401 - fixtures: served broker, Chromium, tab
    CLIENT_NAME,
    SQLITE_ONLY,
    Broker,
    Tab,
    approve_local,
    assert_page_headers,
    assert_styled,
    broker,
    broker_settings,
    browser,
    client_name,
    context,
    open_consent,
    outside,
    screenshot,
    sign_in,
    tab,
    wait_for_client,
)
from tests.support import redeem
from tests.test_lifecycle import refresh


def connect(tab: Tab, broker: Broker, *, first: bool) -> dict[str, Any]:  # noqa: F811
    """One authorization in this browser, its code redeemed: the token response. The first
    goes through consent and the login form; later ones through the one-click confirmation."""
    if first:
        _, verifier, _ = open_consent(tab, broker)
        approve_local(tab, broker)
        sign_in(tab)
    else:
        url, _, verifier = broker.authorize_url()
        tab.page.goto(url)
        tab.page.click("#confirm")
    result = wait_for_client(tab, broker)
    tokens = redeem(
        broker.app.test_client(),
        broker.client_id,
        result["code"],
        verifier,
        redirect_uri=broker.redirect_uri,
    )
    assert tokens.status_code == 200, tokens.json
    assert tokens.json is not None
    return dict(tokens.json)


def refreshes(broker: Broker, tokens: dict[str, Any]) -> bool:  # noqa: F811
    answer = refresh(broker.app.test_client(), broker.client_id, tokens["refresh_token"])
    if answer.status_code == 200:
        tokens.update(answer.json)
        return True
    assert answer.json is not None and answer.json["error"] == "invalid_grant", answer.json
    return False


def grant_ids(tab: Tab) -> list[str]:  # noqa: F811
    return [
        value or ""
        for value in tab.page.eval_on_selector_all(
            "input[name=grant]", "inputs => inputs.map(i => i.value)"
        )
    ]


@SQLITE_ONLY
def test_the_account_page_lists_connections_and_disconnects_one_then_all(
    broker: Broker,  # noqa: F811
    tab: Tab,  # noqa: F811
) -> None:
    first = connect(tab, broker, first=True)
    second = connect(tab, broker, first=False)

    response = tab.page.goto(f"{broker.url}/account")
    assert response is not None and response.status == 200
    assert_page_headers(response, "account page")
    page = tab.page
    assert page.title() == "Connected applications"
    assert page.inner_text("#signed-in-as") == "alice@example.com"
    assert page.locator("section.connection .client-name").all_inner_texts() == [CLIENT_NAME] * 2
    assert page.locator(".resource-name").all_inner_texts() == ["Demo tools"] * 2
    scopes = page.locator("section.connection").first.locator("code").all_inner_texts()
    assert scopes == ["demo:read", "demo:write"]
    assert all(t.endswith(" UTC") for t in page.locator(".last-token-at").all_inner_texts())
    assert_styled(tab, "account page")
    screenshot(tab, "account.png")

    ids = grant_ids(tab)
    assert len(ids) == 2
    with page.expect_navigation(url=f"{broker.url}/account?disconnected=1"):
        page.click(f"#disconnect-{ids[0]}")
    assert page.inner_text("#notice").startswith("Disconnected 1 application.")
    assert grant_ids(tab) == [ids[1]]
    screenshot(tab, "account-disconnected.png")
    assert not refreshes(broker, first)  # that grant's next refresh is refused ...
    assert refreshes(broker, second)  # ... the other one's is not

    with page.expect_navigation(url=f"{broker.url}/account?disconnected=1"):
        page.click("#disconnect-all")
    assert page.is_visible("#no-connections")
    assert not refreshes(broker, second)
    screenshot(tab, "account-empty.png")
    assert tab.csp_messages() == [], tab.console
    # the POSTs were answered by redirects back to the page: nothing else was visited
    assert {u.split("?")[0] for u in tab.navigations[-4:]} == {
        f"{broker.url}/account/disconnect",
        f"{broker.url}/account/disconnect-all",
        f"{broker.url}/account",
    }


@SQLITE_ONLY
def test_the_account_page_without_a_session_says_to_sign_in(
    broker: Broker,  # noqa: F811
    tab: Tab,  # noqa: F811
) -> None:
    response = tab.page.goto(f"{broker.url}/account")
    assert response is not None and response.status == 200
    assert_page_headers(response, "account page, not signed in")
    assert tab.page.title() == "Not signed in"
    assert "not signed in" in tab.page.inner_text("#not-signed-in")
    assert tab.page.query_selector("form") is None
    assert tab.page.url == f"{broker.url}/account"  # no redirect anywhere
    assert_styled(tab, "account page, not signed in")
    screenshot(tab, "account-signed-out.png")


@SQLITE_ONLY
def test_the_account_page_with_a_forged_csrf_token_is_refused_on_a_page(
    broker: Broker,  # noqa: F811
    tab: Tab,  # noqa: F811
) -> None:
    tokens = connect(tab, broker, first=True)
    tab.page.goto(f"{broker.url}/account")
    tab.page.eval_on_selector_all(
        "input[name=csrf]", "inputs => inputs.forEach(i => { i.value = 'f'.repeat(64); })"
    )
    with tab.page.expect_response(lambda r: r.request.method == "POST") as info:
        tab.page.click("#disconnect-all")
    assert info.value.status == 400
    assert_page_headers(info.value, "account CSRF failure page")
    tab.page.wait_for_selector("#message")
    assert tab.page.title() == "Form expired"
    assert refreshes(broker, tokens)
