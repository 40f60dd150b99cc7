"""The Space as an MCP server (Gradio's mcp_server): an agent lists the tools, generates game art, queues
and follows a request, and gets the same validation, cache and admission rules as any API caller."""

from __future__ import annotations

import ast
import asyncio
import base64
import io
import json
import time
import urllib.error
import urllib.request

import httpx
from gradio_client import Client
from PIL import Image

from tests.conftest import start_app, stop_app

TOOLS = {"generate_image", "submit", "submit_batch", "wait_all", "status", "cancel", "history"}
SMALL = {"negative_prompt": "", "preset": "base", "width": 256, "height": 256, "steps": 2, "guidance_scale": 5.0}


def mcp(url: str, calls, headers: dict[str, str] | None = None):
    """Opens an MCP session on the app's streamable HTTP endpoint and runs calls(session) in it."""
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    async def run():
        async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(30, read=300)) as http, \
                streamable_http_client(f"{url}/gradio_api/mcp/", http_client=http) as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                return await calls(session)

    return asyncio.run(run())


def texts(result) -> list[str]:
    return [item.text for item in result.content if item.type == "text"]


def test_the_tools_are_listed_with_every_argument_described(app_server) -> None:
    async def listed(session):
        return (await session.list_tools()).tools

    tools = {tool.name: tool for tool in mcp(app_server.url, listed)}
    assert set(tools) == TOOLS  # /generate (three outputs, one a State) is for the UI and gradio_client
    for tool in tools.values():
        assert tool.description, tool.name
        for name, schema in tool.inputSchema["properties"].items():
            assert schema.get("description"), f"{tool.name}.{name} has no description"
    assert tools["generate_image"].inputSchema["properties"]["preset"]["enum"] == ["base"]


def test_an_agent_generates_an_image_through_the_same_request_and_cache(app_server) -> None:
    async def generate(session):
        return await session.call_tool("generate_image", {"prompt": "an agent's rune stone", "seed": 11, **SMALL})

    result = mcp(app_server.url, generate)
    assert not result.isError, texts(result)
    image = next(item for item in result.content if item.type == "image")
    assert image.mimeType == "image/png"
    assert Image.open(io.BytesIO(base64.b64decode(image.data))).size == (256, 256)
    assert any(text.startswith("Image URL: http") for text in texts(result))
    # The very same request through gradio_client is a cache hit: one request type, one fingerprint.
    _, meta = Client(app_server.url, verbose=False).predict(
        prompt="an agent's rune stone", seed=11, api_name="/generate", **SMALL)
    assert meta["cached"] is True


def test_a_bad_argument_is_refused_with_the_field_named(app_server) -> None:
    async def generate(session):
        return await session.call_tool("generate_image", {"prompt": "a shield", "seed": 1, **SMALL, "width": 300})

    result = mcp(app_server.url, generate)
    assert result.isError
    assert any("width: must be a multiple of 8" in text for text in texts(result)), texts(result)


def test_an_agent_queues_then_follows_its_request(app_server) -> None:
    async def queue_and_follow(session):
        submitted = await session.call_tool("submit", {"prompt": "a queued banner", "seed": 5, **SMALL,
                                                       "request_id": "agent-banner-5"})
        assert not submitted.isError, texts(submitted)
        request_id, status = texts(submitted)[0], {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and status.get("state") != "done":
            await asyncio.sleep(0.5)
            status = dict_of(await session.call_tool("status", {"request_id": request_id}))
        return request_id, status

    request_id, status = mcp(app_server.url, queue_and_follow)
    assert request_id == "agent-banner-5"
    assert status["state"] == "done" and status["request_id"] == "agent-banner-5", status
    assert status["result"]["seed"] == 5


def dict_of(result) -> dict:
    """A JSON output comes back as the text of the dict (Gradio's MCP bridge writes str(value))."""
    text = texts(result)[0]
    try:
        return json.loads(text)
    except ValueError:
        return ast.literal_eval(text)


def test_a_forged_forwarded_host_cannot_redirect_tool_calls(tiny_model, tmp_path) -> None:
    """Gradio's MCP bridge would build its loopback client from the first caller's X-Forwarded-Host and
    keep it for everyone; the app pins it to itself. A dead port as the forged host proves it: were the
    header used, the call would fail to connect, and so would the next caller's."""
    app = start_app(tiny_model, tmp_path, MODEL_PRESET="base")
    try:
        async def generate(session):
            return await session.call_tool("generate_image", {"prompt": "a forged host", "seed": 3, **SMALL})

        forged = mcp(app.url, generate, headers={"X-Forwarded-Host": "127.0.0.1:9", "X-Forwarded-Proto": "http"})
        assert not forged.isError, texts(forged)
        honest = mcp(app.url, generate)
        assert not honest.isError, texts(honest)
    finally:
        stop_app(app)


def test_mcp_server_0_turns_the_tools_off(tiny_model, tmp_path) -> None:
    app = start_app(tiny_model, tmp_path, MODEL_PRESET="base", WARMUP="0", MCP_SERVER="0")
    try:
        try:
            urllib.request.urlopen(f"{app.url}/gradio_api/mcp/schema", timeout=5)
            raise AssertionError("the MCP schema answered with MCP_SERVER=0")
        except urllib.error.HTTPError as error:
            assert error.code == 404
        assert Client(app.url, verbose=False).predict(api_name="/ping") == "pong"  # the API itself still answers
    finally:
        stop_app(app)
