"""A designer's path in a real browser: type a prompt, click Generate, see the image."""

from __future__ import annotations

import re

from tests.conftest import open_form


def test_type_prompt_click_generate_see_image(browser, app_server, artifacts) -> None:
    page = open_form(browser, app_server.url, "a glowing crystal sword, game item icon", Width="256", Height="256",
                     Steps="3")
    page.locator("#generate").click()
    image = page.locator("#result-image img")
    image.wait_for(state="visible", timeout=60_000)
    assert "/gradio_api/file=" in image.get_attribute("src")
    page.locator("#metadata").get_by_text("seed_derived").wait_for(timeout=10_000)
    metadata = "".join(page.locator("#metadata").inner_text().split())  # the viewer breaks lines
    assert '"cached":false' in metadata and '"seed_derived":true' in metadata
    page.screenshot(path=str(artifacts / "generate.png"), full_page=True)


def test_bad_input_shows_an_error_naming_the_field(browser, app_server, artifacts) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(app_server.url, wait_until="domcontentloaded")
    page.locator("#prompt textarea").fill("a shield")
    page.get_by_label("Width").fill("300")
    page.locator("#generate").click()
    page.get_by_text("width: must be a multiple of 8").first.wait_for(timeout=20_000)
    page.screenshot(path=str(artifacts / "invalid-input.png"), full_page=True)


def test_the_page_shows_how_to_connect_an_agent(browser, app_server, artifacts) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(app_server.url, wait_until="domcontentloaded")
    page.get_by_text("Use via API or MCP").first.click()
    page.get_by_text("MCP", exact=True).first.click()  # the API panel's MCP tab
    page.get_by_text(f"{app_server.url}/gradio_api/mcp/").first.wait_for(timeout=20_000)
    for tool in ("generate_image", "submit", "status", "cancel"):
        page.get_by_text(tool, exact=True).first.wait_for(timeout=10_000)
    page.screenshot(path=str(artifacts / "mcp.png"), full_page=True)


def test_variants_show_as_a_gallery_and_a_click_shows_one(browser, app_server, artifacts) -> None:
    page = open_form(browser, app_server.url, "a treasure chest, three takes, game item icon", height_px=1100,
                     Width="256", Height="256", Steps="3", Seed="40", Images="3")
    page.locator("#generate").click()
    thumbnails = page.locator("#variants img")
    thumbnails.nth(2).wait_for(state="visible", timeout=90_000)
    assert thumbnails.count() == 3
    page.locator("#metadata").get_by_text("variants").wait_for(timeout=10_000)
    thumbnails.nth(1).click()
    page.locator("#metadata").get_by_text("41").first.wait_for(timeout=10_000)
    metadata = "".join(page.locator("#metadata").inner_text().split())
    assert '"seed":41' in metadata
    page.screenshot(path=str(artifacts / "variants.png"), full_page=True)


def test_cancel_stops_every_variant_of_the_click(browser, app_server, artifacts) -> None:
    page = open_form(browser, app_server.url, "a slow pair of banners", Width="512", Height="512", Steps="50",
                     Images="2")
    page.locator("#generate").click()
    page.get_by_text("steps").first.wait_for(timeout=60_000)  # the first variant is running
    page.get_by_role("button", name="Cancel", exact=True).click()
    page.get_by_text(re.compile("cancelled")).first.wait_for(timeout=60_000)  # the error toast, not the button
    page.screenshot(path=str(artifacts / "variants-cancelled.png"), full_page=True)
    assert page.locator("#variants img").count() == 0
