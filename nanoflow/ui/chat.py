"""``nanoflow chat``: a Gradio chat page streaming tokens from an in-process AsyncEngine.

The Gradio app is mounted on a FastAPI app whose lifespan starts and stops the engine, so the engine's streams and
Gradio's handlers share uvicorn's one event loop. Each turn formats the whole conversation with the tokenizer's chat
template, streams the reply into the chat window, and shows tokens, tokens/s and time to first token underneath.
Stopping a turn (the Stop button, or closing the page) cancels the handler, whose ``finally`` aborts the engine
request so its KV blocks are freed.
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

DEFAULT_CHAT_PORT = 7860
STATS_IDLE = "Ready."


def message_text(content: Any) -> str:
    """The plain text of a Gradio chat message's content (a string, a part dict, or a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("value") or "")
    if isinstance(content, (list, tuple)):
        return "".join(message_text(part) for part in content)
    return "" if content is None else str(content)


def format_stats(num_tokens: int, started: float, first_token: float | None, now: float, done: bool) -> str:
    """The line under the chat: ``32 tokens · 41.7 tokens/s · first token 120 ms``."""
    if first_token is None:
        return "Waiting for the first token…"
    elapsed = max(now - started, 1e-9)
    state = "done" if done else "streaming"
    return (f"{num_tokens} tokens · {num_tokens / elapsed:.1f} tokens/s · first token "
            f"{(first_token - started) * 1e3:.0f} ms · {state}")


class ChatSession:
    """Turns one chat turn into engine calls; separate from Gradio so it can be tested without a browser."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    async def reply(
        self, history: list[dict[str, Any]], temperature: float, top_p: float, max_tokens: int,
        conversation_id: str | None = None, repetition_penalty: float = 1.0,
    ) -> AsyncIterator[tuple[str, str]]:
        """Yield ``(reply text so far, stats line)`` for the conversation ``history`` (ending with the user).
        ``conversation_id`` scopes KV reuse across turns when the engine offloads KV (``--kv-offload``);
        ``repetition_penalty`` > 1 discourages repeating the conversation's tokens (``SamplingParams``)."""
        from nanoflow.scheduler.request import SamplingParams

        engine = self.engine
        messages = [{"role": m["role"], "content": message_text(m.get("content"))} for m in history]
        ids = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        room = engine.max_model_len - len(ids)
        if room < 1:
            yield "", (f"The conversation has {len(ids)} tokens; the context holds {engine.max_model_len}. "
                       "Press Clear to start over.")
            return
        params = SamplingParams(max_tokens=min(int(max_tokens), room), temperature=float(temperature),
                                top_p=float(top_p), conversation_id=conversation_id,
                                repetition_penalty=float(repetition_penalty))
        request_id = f"chat-ui-{uuid.uuid4().hex}"
        started, first, finished = time.monotonic(), None, False
        try:
            async for out in engine.generate(ids, params, request_id):
                now = time.monotonic()
                first = first if first is not None else now
                finished = out.finished
                if out.finish_reason == "error":
                    yield out.text, f"Error: {out.error}"
                    return
                # A trailing U+FFFD is half of a multi-byte character; it completes with the next token.
                text = out.text if finished else out.text.rstrip("\ufffd")
                yield text, format_stats(len(out.token_ids), started, first, now, finished)
        finally:
            if not finished:  # the user pressed Stop or left: free the request's KV cache
                await engine.abort(request_id)


def build_ui(engine: Any) -> Any:
    """The Gradio Blocks page for ``engine``."""
    import gradio as gr

    session = ChatSession(engine)
    max_new = max(1, min(4096, engine.max_model_len - 1))
    with gr.Blocks(title=f"NanoFlow chat · {engine.model_name}", analytics_enabled=False) as demo:
        gr.Markdown(f"## NanoFlow chat · `{engine.model_name}`")
        chatbot = gr.Chatbot(label="Conversation", elem_id="chatbot", height=420)
        with gr.Row():
            box = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, elem_id="prompt",
                             scale=8, autofocus=True)
            send = gr.Button("Send", variant="primary", elem_id="send", scale=1)
            stop = gr.Button("Stop", elem_id="stop", scale=1)
            clear = gr.Button("Clear", elem_id="clear", scale=1)
        stats = gr.Markdown(STATS_IDLE, elem_id="stats")
        with gr.Accordion("Sampling", open=False):
            temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="Top-p")
            max_tokens = gr.Slider(1, max_new, value=min(256, max_new), step=1, label="Max new tokens",
                                   elem_id="max-tokens")
            repetition = gr.Slider(1.0, 2.0, value=1.0, step=0.05, label="Repetition penalty (1 = off)",
                                   elem_id="repetition-penalty")

        async def respond(message: str, history: list[dict[str, Any]] | None, temp: float, p: float, limit: float,
                          rep: float = 1.0, request: gr.Request = None,
                          ) -> AsyncIterator[tuple[list[dict[str, Any]], str, str]]:
            history = list(history or [])
            if not message.strip():
                yield history, "", STATS_IDLE
                return
            history.append({"role": "user", "content": message})
            shown = [*history, {"role": "assistant", "content": ""}]
            yield shown, "", "Waiting for the first token…"
            # One browser session, one conversation: with --kv-offload each turn reuses the KV of the ones before.
            conversation = getattr(request, "session_hash", None) or None
            async for text, line in session.reply(history, temp, p, int(limit), conversation, float(rep)):
                shown[-1] = {"role": "assistant", "content": text}
                yield shown, "", line

        inputs = [box, chatbot, temperature, top_p, max_tokens, repetition]
        outputs = [chatbot, box, stats]
        events = [box.submit(respond, inputs, outputs), send.click(respond, inputs, outputs)]
        stop.click(None, None, None, cancels=events)
        clear.click(lambda: ([], "", STATS_IDLE), None, outputs, cancels=events)
    return demo


def create_chat_app(engine: Any) -> Any:
    """A FastAPI app serving the chat page at ``/`` and ``GET /health``; its lifespan runs the engine."""
    import gradio as gr
    from fastapi import FastAPI

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        try:
            yield
        finally:
            await engine.shutdown()

    app = FastAPI(title="NanoFlow chat", lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "model": engine.model_name}

    return gr.mount_gradio_app(app, build_ui(engine), path="/")


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from nanoflow.serve.cli import add_engine_arguments, add_server_arguments

    add_engine_arguments(parser)
    add_server_arguments(parser, DEFAULT_CHAT_PORT)
    parser.set_defaults(func=run)
    return parser


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``chat`` on an ``argparse`` subparsers object; returns the new parser."""
    parser = subparsers.add_parser(
        "chat",
        help="open a Gradio chat page on a local model",
        description="Chat with a model in the browser: streamed replies, sampling controls, tokens/s.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    return configure_parser(parser)


def run(args: argparse.Namespace) -> int:
    """Run ``nanoflow chat``; returns the process exit code."""
    import sys

    from nanoflow.serve.cli import build_engine, serve_app, uvicorn_log_level

    try:
        engine = build_engine(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"nanoflow chat: cannot load the model: {e}", file=sys.stderr)
        return 2
    print(f"NanoFlow chat on http://{args.host}:{args.port}/", file=sys.stderr)
    return serve_app(create_chat_app(engine), args.host, args.port, graceful_timeout=args.graceful_timeout,
                     log_level=uvicorn_log_level(args))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nanoflow.ui.chat", description="NanoFlow chat page.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--log-level", default="info", help="log level (debug, info, warning, error)")
    return run(configure_parser(parser).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
