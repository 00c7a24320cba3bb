"""The web chat page on a server with API keys: the key is asked for on 401, kept in the tab's session storage,
and a wrong key is asked for again. Under a route prefix, so the page's relative URLs are exercised too."""

from __future__ import annotations

import pytest
from playwright.sync_api import Page, expect

from tests.support import TINY, app_config, serve_app

APP, PREFIX, KEY = "sessionserve-web-auth", "/webauth", "web-key"


@pytest.fixture(scope="module")
def keyed_url(smollm2_dir, serve_port, tmp_path_factory):
    store = f"sqlite:///{tmp_path_factory.mktemp('web-auth') / 'sessions.db'}"
    with serve_app(app_config(store, model=TINY, torch_threads=1, api_keys=(KEY,)), serve_port, APP, PREFIX) as url:
        yield url


def enter_key(page: Page, key: str, expected_message: str) -> None:
    dialog = page.locator("#key-dialog")
    expect(dialog).to_be_visible()
    expect(page.locator("#key-message")).to_contain_text(expected_message)
    page.locator("#key-input").fill(key)
    page.get_by_role("button", name="Use key").click()


def test_page_asks_for_the_key_once_per_tab(chromium_page: Page, keyed_url: str) -> None:
    page = chromium_page
    page.goto(keyed_url)  # /webauth redirects to /webauth/, where the page's relative URLs resolve
    assert page.url.endswith(f"{PREFIX}/")
    enter_key(page, "wrong-key", "missing API key")
    enter_key(page, KEY, "invalid API key")
    expect(page.locator("#key-dialog")).to_be_hidden()
    # waits (Playwright's default timeout) rather than reads once: on a loaded machine the check once ran before
    # the page had stored the key
    page.wait_for_function(f"sessionStorage.getItem('sessionserve.apiKey') === {KEY!r}")
    assert page.evaluate("localStorage.length") == 0

    page.get_by_role("button", name="New chat").click()
    page.wait_for_function("location.hash.length > 1")
    sid = page.evaluate("decodeURIComponent(location.hash.slice(1))")
    page.locator("#max-new-tokens").fill("4")
    page.locator("#prompt").fill("hello")
    page.locator("#prompt").press("Enter")
    expect(page.locator(".message.assistant .turn-stats")).to_be_visible(timeout=120_000)

    page.reload()  # the key survives in this tab: no dialog, the session is listed
    expect(page.locator(f'.session[data-session-id="{sid}"]')).to_be_visible()
    expect(page.locator("#key-dialog")).to_be_hidden()
    expect(page.locator(".message.user .content")).to_have_text("hello")
