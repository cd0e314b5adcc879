"""The Gradio chat page: its helpers, its engine session on the fake engine, and headless Chromium (Playwright)
driving the real page — on the fake engine in-process, and on ``nanoflow chat`` with the embedded model.

Chromium comes from Debian (``apt-get install chromium``), never from ``playwright install``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fake_engine import FakeEngine, greedy_reply
from serve_harness import ServerProcess, ServerThread, real_engine_missing

from nanoflow.ui.chat import ChatSession, create_chat_app, format_stats, message_text

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BROWSER_MISSING = (
    "the playwright package is not installed" if importlib.util.find_spec("playwright") is None
    else None if shutil.which("chromium") else "no system Chromium: apt-get install chromium"
)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_message_text_flattens_gradio_content() -> None:
    assert message_text("hi") == "hi"
    assert message_text({"type": "text", "text": "a"}) == "a"
    assert message_text([{"type": "text", "text": "a"}, "b"]) == "ab"
    assert message_text(None) == ""


def test_format_stats_arithmetic() -> None:
    assert format_stats(0, 10.0, None, 11.0, False).startswith("Waiting")
    line = format_stats(10, 100.0, 100.25, 102.0, True)
    assert line == "10 tokens · 5.0 tokens/s · first token 250 ms · done"


def test_chat_session_streams_the_greedy_reply() -> None:
    engine = FakeEngine()
    history = [{"role": "user", "content": "Hello"}]

    async def run() -> list[tuple[str, str]]:
        return [step async for step in ChatSession(engine).reply(history, 0.0, 1.0, 30)]

    steps = asyncio.run(run())
    prompt = engine.tokenizer.apply_chat_template(history, add_generation_prompt=True)
    expected = greedy_reply(list(prompt.encode()))[:30].decode("utf-8", errors="replace")
    assert steps[-1][0] == expected
    assert "done" in steps[-1][1] and "tokens/s" in steps[-1][1]
    assert len({text for text, _ in steps}) > 10  # streamed piece by piece
    assert all("\ufffd" not in text for text, _ in steps)


def test_chat_session_passes_the_conversation_id_and_penalty() -> None:
    """The page's session id reaches the engine as the KV-reuse scope (``--kv-offload``), and its repetition-penalty
    slider as ``SamplingParams.repetition_penalty``."""
    engine = FakeEngine()
    seen = []
    real = engine.generate

    def spy(prompt, params, request_id):
        seen.append((params.conversation_id, params.repetition_penalty))
        return real(prompt, params, request_id)

    engine.generate = spy

    async def run() -> None:
        async for _ in ChatSession(engine).reply([{"role": "user", "content": "Hi"}], 0.0, 1.0, 4, "session-7",
                                                 1.25):
            pass

    asyncio.run(run())
    assert seen == [("session-7", 1.25)]


def test_chat_session_stopped_early_aborts_the_request() -> None:
    engine = FakeEngine(token_delay=0.01)

    async def run() -> None:
        steps = ChatSession(engine).reply([{"role": "user", "content": "Hi"}], 0.7, 0.9, 400)
        async for _ in steps:
            break
        await steps.aclose()

    asyncio.run(run())
    assert len(engine.aborted) == 1 and engine.stats()["num_running"] == 0


# ---- headless Chromium ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if BROWSER_MISSING:
        pytest.skip(BROWSER_MISSING)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


_RECORD_REPLIES = """() => {
    window.__replies = [];
    const record = () => {
        const bots = document.querySelectorAll('#chatbot .bot');
        if (bots.length) window.__replies.push(bots[bots.length - 1].innerText);
    };
    new MutationObserver(record).observe(document.querySelector('#chatbot'),
                                         {subtree: true, childList: true, characterData: true});
}"""


def chat_once(browser: Any, url: str, message: str, max_tokens: int | None = None,
              timeout: float = 120.0) -> tuple[list[str], str]:
    """Open the page, send ``message``; returns the distinct reply texts seen while streaming and the stats line."""
    page = browser.new_page()
    try:
        page.goto(url, timeout=60_000)
        if max_tokens is not None:
            page.get_by_text("Sampling").click()
            box = page.locator("#max-tokens input[type=number]")
            box.fill(str(max_tokens))
            box.press("Enter")
        # Record every state of the reply bubble as the page changes it, so a fast stream is not missed between
        # two polls of a loaded machine.
        page.evaluate(_RECORD_REPLIES)
        prompt = page.locator("#prompt textarea")
        prompt.fill(message)
        prompt.press("Enter")
        page.wait_for_function("document.querySelector('#stats').innerText.endsWith('done')",
                               timeout=timeout * 1000)
        stats = page.locator("#stats").inner_text()
        final = page.locator("#chatbot .bot").last.inner_text()
        seen = [text for text in page.evaluate("window.__replies") if text]
        seen = [text for i, text in enumerate(seen) if i == 0 or text != seen[i - 1]]
        if not seen or seen[-1] != final:
            seen.append(final)
        user_text = page.locator("#chatbot .user").last.inner_text()
        assert message in user_text
        return seen, stats
    finally:
        page.close()


def test_page_streams_reply_from_fake_engine(browser: Any) -> None:
    with ServerThread(create_chat_app(FakeEngine(token_delay=0.02))) as url:
        seen, stats = chat_once(browser, url + "/", "Hello page", max_tokens=60)
    assert stats.endswith("done") and "tokens/s" in stats, stats
    final = seen[-1]
    partial = [text for text in seen[:-1] if final.startswith(text)]
    assert len(partial) >= 2, seen  # several growing prefixes of the reply were on screen: it was streamed


def test_stop_button_aborts_the_engine_request(browser: Any) -> None:
    engine = FakeEngine(token_delay=0.05)  # default 256 new tokens: ~13 s unless stopped
    with ServerThread(create_chat_app(engine)) as url:
        page = browser.new_page()
        try:
            page.goto(url + "/", timeout=60_000)
            page.locator("#prompt textarea").fill("Tell me everything")
            page.locator("#prompt textarea").press("Enter")
            page.wait_for_function("document.querySelector('#stats').innerText.includes('streaming')", timeout=30_000)
            page.locator("#stop").click()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not engine.aborted:
                time.sleep(0.05)
        finally:
            page.close()
    assert len(engine.aborted) == 1 and set(engine.finished.values()) == {"abort"}


REAL_MISSING = real_engine_missing()


@pytest.mark.slow
@pytest.mark.skipif(REAL_MISSING is not None, reason=REAL_MISSING or "")
def test_page_streams_reply_from_real_engine(browser: Any, tmp_path: Any) -> None:
    proc = ServerProcess(["chat", "--device", "cpu"], tmp_path / "chat.log")
    url = proc.start()
    try:
        seen, stats = chat_once(browser, url + "/", "What is the capital of France?", max_tokens=24)
    finally:
        code = proc.stop()
    assert stats.endswith("done") and "tokens/s" in stats, stats
    assert seen[-1].strip(), "the reply is empty"
    assert len(seen) >= 2, seen
    assert code == 0, proc.log()
