"""The web chat page at / in headless Chromium, against the real served app (SmolLM2 on Ray Serve, SQLite)."""

from __future__ import annotations

import httpx
from playwright.sync_api import Page, Route, expect

REPLY_MS = 180_000  # a turn of the real model on a shared 2-core machine
QUESTION = "What is the capital of France?"

# Records every text the streaming reply shows, so the test can tell a streamed reply from one set at once.
RECORD_PARTIAL_REPLIES = """
window.partialReplies = [];
new MutationObserver(() => {
  const text = document.querySelector(".message.assistant.streaming .content")?.textContent;
  if (text) window.partialReplies.push(text);
}).observe(document, { subtree: true, childList: true, characterData: true });
"""


def current_session(page: Page) -> str:
    return page.evaluate("decodeURIComponent(location.hash.slice(1))")


def new_session(page: Page) -> str:
    before = current_session(page)
    page.get_by_role("button", name="New chat").click()
    page.wait_for_function(f"location.hash.length > 1 && location.hash !== {('#' + before)!r}")
    return current_session(page)


def ask(page: Page, prompt: str, max_new_tokens: int) -> dict:
    """Type a prompt, send it with Enter, wait for the turn's stats; the request body the page sent."""
    replies = page.locator(".message.assistant")
    count = replies.count()
    page.locator("#max-new-tokens").fill(str(max_new_tokens))
    page.locator("#prompt").fill(prompt)
    with page.expect_request("**/query") as sent:
        page.locator("#prompt").press("Enter")
    expect(replies.nth(count).locator(".turn-stats")).to_be_visible(timeout=REPLY_MS)
    return sent.value.post_data_json


def sidebar_item(page: Page, sid: str):
    return page.locator(f'.session[data-session-id="{sid}"]')


def test_chat_streams_forks_renames_and_deletes(chromium_page: Page, http_url: str, screenshot) -> None:
    page = chromium_page
    page.add_init_script(RECORD_PARTIAL_REPLIES)
    page.goto(f"{http_url}/")
    expect(page.get_by_role("button", name="New chat")).to_be_enabled()

    sid = new_session(page)
    expect(sidebar_item(page, sid)).to_be_visible()
    body = ask(page, QUESTION, max_new_tokens=48)
    assert body == {"prompt": QUESTION, "max_new_tokens": 48, "temperature": 0, "stream": True}  # greedy

    reply = page.locator(".message.assistant").last
    expect(reply.locator(".content")).to_contain_text("Paris")
    final = reply.locator(".content").text_content()
    partials = page.evaluate("window.partialReplies")
    assert any("Paris" not in text for text in partials), partials  # text was on the page before "Paris" was
    assert len(set(partials)) >= 2 and all(final.startswith(text) for text in partials), (partials, final)

    stats = reply.locator(".turn-stats")
    expect(stats).to_contain_text("TTFT")
    assert stats.get_attribute("data-kv-tier") == "device"
    assert float(stats.get_attribute("data-ttft-ms")) > 0
    assert int(stats.get_attribute("data-cached-tokens")) >= 0
    expect(sidebar_item(page, sid).locator(".title")).to_have_text(QUESTION)  # titled after its first prompt

    page.get_by_role("button", name="Fork").click()
    page.wait_for_function(f"location.hash !== {('#' + sid)!r}")
    fork = current_session(page)
    expect(page.locator("#chat-title")).to_have_text(f"{QUESTION} (fork)")
    expect(page.locator(".message.assistant .content").first).to_contain_text("Paris")  # the parent's history
    ask(page, "And of Italy?", max_new_tokens=24)
    fork_stats = page.locator(".message.assistant").last.locator(".turn-stats")
    assert int(fork_stats.get_attribute("data-cached-tokens")) > 0  # the fork reused its parent's KV
    screenshot(page, "chat-fork")

    page.reload()
    expect(sidebar_item(page, sid)).to_be_visible()
    expect(sidebar_item(page, fork)).to_be_visible()
    sidebar_item(page, sid).click()
    expect(page.locator("#chat-title")).to_have_text(QUESTION)
    expect(page.locator(".message.assistant .content")).to_contain_text("Paris")
    expect(page.locator(".message.assistant .turn-stats")).to_contain_text("KV on device")  # kept across the reload
    screenshot(page, "chat-paris")

    # Until the fork has loaded, the header still shows the parent: its actions wait (a Rename started here lost
    # focus when the load finished and renamed the fork after its parent). The fork's history is held to see it.
    held: list[Route] = []
    page.route(f"**/v1/sessions/{fork}/messages", lambda route: held.append(route))
    sidebar_item(page, fork).click()
    expect(page.get_by_role("button", name="Rename")).to_be_disabled()
    for _ in range(100):  # Playwright hands the held request to its handler while the test waits on the page
        if held:
            break
        page.wait_for_timeout(100)
    assert held, "the page did not ask for the fork's history"
    for route in held:
        route.continue_()
    page.unroute(f"**/v1/sessions/{fork}/messages")
    page.get_by_role("button", name="Rename").click()
    page.locator("#title-input").fill("Italy branch")
    page.locator("#title-input").press("Enter")
    expect(sidebar_item(page, fork).locator(".title")).to_have_text("Italy branch")
    with httpx.Client(base_url=http_url, timeout=30) as api:
        assert api.get(f"/v1/sessions/{fork}").json()["metadata"] == {"title": "Italy branch"}

        page.once("dialog", lambda dialog: dialog.accept())
        page.get_by_role("button", name="Delete").click()
        expect(sidebar_item(page, fork)).to_have_count(0)
        assert api.get(f"/v1/sessions/{fork}").status_code == 404
        page.reload()
        expect(sidebar_item(page, sid)).to_be_visible()
        expect(sidebar_item(page, fork)).to_have_count(0)
        assert api.delete(f"/v1/sessions/{sid}").status_code == 204
