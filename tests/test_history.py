"""History: a designer's recent images, kept under a key only they hold (the browser's, or a signed-in
name), in Redis so every clone shows them; reuse one's settings, send one to the sketch."""

from __future__ import annotations

import secrets

import pytest
from gradio_client import Client

from tests.conftest import open_form, start_app, stop_app

FIELDS = dict(negative_prompt="", preset="base", width=256, height=256, steps=2, guidance_scale=5.0)


def test_history_follows_its_key_across_clones(tiny_model, tmp_path, redis_server) -> None:
    """Two Spaces on one Redis: what one made under a key, the other lists; another key sees nothing."""
    env = dict(MODEL_PRESET="base", WARMUP="0", REDIS_URL=redis_server.url, REDIS_NAMESPACE=f"h{secrets.token_hex(4)}")
    a = start_app(tiny_model, tmp_path / "a", **env)
    b = start_app(tiny_model, tmp_path / "b", **env)
    try:
        key = secrets.token_hex(16)
        on_a = Client(a.url, verbose=False)
        on_a.predict("a copper kettle", **FIELDS, seed=1, history_key=key, api_name="/generate")
        on_a.predict("a silver bell", **FIELDS, seed=2, loras=[], history_key=key, api_name="/generate")
        on_a.predict("someone else's sword", **FIELDS, seed=3, history_key=secrets.token_hex(16), api_name="/generate")
        listed = Client(b.url, verbose=False).predict(key, api_name="/history")
        assert [entry["prompt"] for entry in listed] == ["a silver bell", "a copper kettle"]  # newest first
        assert listed[0]["seed"] == 2 and listed[0]["width"] == 256 and listed[0]["url"].startswith(a.url)
        assert Client(b.url, verbose=False).predict(secrets.token_hex(16), api_name="/history") == []
        with pytest.raises(Exception, match="history_key: at least 16 characters"):
            on_a.predict("short", api_name="/history")
    finally:
        stop_app(a)
        stop_app(b)


def test_the_page_keeps_a_history_and_reuses_it(browser, app_server, artifacts) -> None:
    page = open_form(browser, app_server.url, "a history test lantern", height_px=1500, Width="256", Height="256",
                     Steps="2", Seed="77")
    page.locator("#generate").click()
    page.locator("#history img").first.wait_for(state="visible", timeout=90_000)
    # A new session in the same browser (localStorage keeps the key) still shows it.
    page.reload(wait_until="domcontentloaded")
    page.get_by_text("Model ready").wait_for(timeout=30_000)
    page.locator("#history img").first.wait_for(state="visible", timeout=30_000)
    page.locator("#prompt textarea").fill("something else")
    page.locator("#history img").first.click()
    page.locator("#history-info").get_by_text("a history test lantern").wait_for(timeout=10_000)
    page.locator("#reuse").click()
    page.wait_for_function("document.querySelector('#prompt textarea').value === 'a history test lantern'",
                           timeout=10_000)
    assert page.get_by_label("Seed").input_value() == "77"
    page.locator("#send-to-sketch").click()
    page.locator("#init-image img").first.wait_for(state="visible", timeout=20_000)
    page.screenshot(path=str(artifacts / "history.png"), full_page=True)
    # Another browser (no key of this one) has no history of it.
    other = browser.new_context().new_page()
    other.goto(app_server.url, wait_until="domcontentloaded")
    other.get_by_text("Model ready").wait_for(timeout=30_000)
    other.wait_for_timeout(1500)
    assert other.locator("#history img").count() == 0
    other.context.close()
    page.context.close()


def test_examples_fill_the_form(browser, app_server) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 1500})
    page.goto(app_server.url, wait_until="domcontentloaded")
    page.get_by_text("a glowing crystal sword, game item icon").first.click()
    page.wait_for_function("document.querySelector('#prompt textarea').value.startsWith('a glowing crystal sword')",
                           timeout=10_000)
