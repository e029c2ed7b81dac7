"""The HTTP side (Starlette, served by uvicorn): OpenAI routes over the engine, server-sent events for
``stream``, Prometheus ``/metrics``. Each request's sequences report to an asyncio queue; a client that goes
away (mid-stream or while waiting for a whole answer) cancels them, which frees their cache rows."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from mtnlg.serve import protocol
from mtnlg.serve.engine import Engine, QueueFull, Sequence
from mtnlg.serve.protocol import ApiError

MAX_BODY_BYTES = 1 << 20  # 1 MiB: prompts are bounded by the context anyway
DISCONNECT_POLL_S = 0.25


class Server:
    def __init__(self, engine: Engine, max_n: int):
        self.engine, self.info, self.metrics = engine, engine.info, engine.metrics
        self.max_n = max_n
        self.created = int(time.time())

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics_text, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
        ])

    # -- small routes -------------------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        if self.engine.error is not None:
            return JSONResponse({"status": "error", "message": str(self.engine.error)}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics_text(self, request: Request) -> Response:
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.info.name, "object": "model", "created": self.created, "owned_by": "mtnlg",
             "max_model_len": self.info.context}]})

    # -- generation -------------------------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        return await self._answer(request, "completions")

    async def chat(self, request: Request) -> Response:
        return await self._answer(request, "chat")

    async def _answer(self, request: Request, kind: str) -> Response:
        try:
            body = await _read_json(request)
            protocol.check_model(body, self.info)
            if kind == "chat":
                prompts = [protocol.chat_prompt(body, self.info)]
                default_max = None
            else:
                prompts = protocol.prompts(body, self.info)
                default_max = 16  # OpenAI's default for completions
            params, n = protocol.params(body, self.info, max(len(p.ids) for p in prompts), default_max,
                                        self.engine.max_batch_tokens, self.max_n)
            if params.echo and kind == "chat":
                raise ApiError(400, "'echo' is a completions option", "echo")
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue = asyncio.Queue()
            seqs = []
            for i in range(len(prompts) * n):
                def emit(event: dict, index: int = i) -> None:  # runs in this loop (the engine hands over per step)
                    queue.put_nowait((index, event))
                seqs.append(Sequence(prompts[i // n].ids, params, emit, loop))
            try:
                self.engine.submit(seqs)
            except QueueFull:
                raise ApiError(429, "the server's queue is full; retry later", None, "rate_limit_exceeded") from None
        except ApiError as e:
            self.metrics.requests.inc(endpoint=kind, status=str(e.status))
            return JSONResponse(e.body(), status_code=e.status)
        ctx = _Answer(self, kind, prompts, n, params, seqs, queue, body)
        self.metrics.requests.inc(endpoint=kind, status="200")
        if body.get("stream"):
            return StreamingResponse(ctx.stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await ctx.whole(request)


async def _read_json(request: Request) -> dict:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body of {int(length)} bytes exceeds the limit of {MAX_BODY_BYTES}")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise ApiError(413, f"request body exceeds the limit of {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "the client disconnected while sending the request") from None
    try:
        body = json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


class _Answer:
    """Collects the events of one request's sequences into an OpenAI response or a stream of chunks."""

    def __init__(self, server: Server, kind: str, prompts, n: int, params, seqs: list[Sequence],
                 queue: asyncio.Queue, body: dict):
        self.server, self.kind, self.prompts, self.n, self.params = server, kind, prompts, n, params
        self.seqs, self.queue = seqs, queue
        self.include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if isinstance(
            body.get("stream_options"), dict) else False
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.name = server.info.name
        m = len(seqs)
        self.text = [""] * m
        self.tokens: list[list[int]] = [[] for _ in range(m)]
        self.entries: list[list] = [[] for _ in range(m)]
        self.prompt_entries: list[list | None] = [None] * m
        self.finish: list[str | None] = [None] * m

    def _prompt(self, i: int):
        return self.prompts[i // self.n]

    def _apply(self, index: int, event: dict) -> None:
        kind = event["type"]
        if kind == "error":
            raise RuntimeError(event["message"])
        if kind == "prompt":
            self.prompt_entries[index] = event["logprobs"]
        elif kind == "token":
            self.text[index] += event["text"]
            self.tokens[index].append(event["token"])
            self.entries[index].append(event["logprobs"])
        elif kind == "done":
            self.finish[index] = event["finish_reason"]

    def _usage(self) -> dict:
        prompt = sum(len(p.ids) for p in self.prompts)
        completion = sum(len(t) for t in self.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _logprobs(self, i: int, echo_prefix: bool) -> dict | None:
        if self.params.logprobs is None:
            return None
        info = self.server.info
        tokens, entries, start = self.tokens[i], self.entries[i], 0
        if echo_prefix and self.params.echo:
            tokens = self._prompt(i).ids + tokens
            entries = (self.prompt_entries[i] or [None] * len(self._prompt(i).ids)) + entries
        return protocol.logprobs_block(info, entries, tokens, start)

    async def whole(self, request: Request) -> Response:
        try:
            while any(f is None for f in self.finish):
                try:
                    index, event = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        self.server.engine.cancel(self.seqs)
                        return Response(status_code=499)
                    continue
                self._apply(index, event)
        except RuntimeError as e:
            return JSONResponse(ApiError(500, str(e)).body(), status_code=500)
        choices = []
        for i in range(len(self.seqs)):
            if self.kind == "chat":
                choices.append({"index": i, "message": {"role": "assistant", "content": self.text[i]},
                                "logprobs": None, "finish_reason": self.finish[i]})
            else:
                text = (self._prompt(i).text if self.params.echo else "") + self.text[i]
                choices.append({"index": i, "text": text, "logprobs": self._logprobs(i, True),
                                "finish_reason": self.finish[i]})
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return JSONResponse({"id": self.id, "object": obj, "created": self.created, "model": self.name,
                             "choices": choices, "usage": self._usage()})

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        data = {"id": self.id, "object": obj, "created": self.created, "model": self.name, "choices": choices}
        if usage is not None:
            data["usage"] = usage
        return f"data: {json.dumps(data)}\n\n"

    async def stream(self) -> AsyncIterator[str]:
        done = False
        try:
            if self.kind == "chat":
                yield self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None} for i in range(len(self.seqs))])
            elif self.params.echo:
                yield self._chunk([{"index": i, "text": self._prompt(i).text, "logprobs": None,
                                    "finish_reason": None} for i in range(len(self.seqs))])
            while any(f is None for f in self.finish):
                index, event = await self.queue.get()
                try:
                    self._apply(index, event)
                except RuntimeError as e:
                    yield f"data: {json.dumps(ApiError(500, str(e)).body())}\n\n"
                    return
                if event["type"] == "token":
                    if self.kind == "chat":
                        choice = {"index": index, "delta": {"content": event["text"]}, "logprobs": None,
                                  "finish_reason": None}
                    else:
                        lp = None
                        if self.params.logprobs is not None:
                            lp = protocol.logprobs_block(self.server.info, [event["logprobs"]], [event["token"]], 0)
                        choice = {"index": index, "text": event["text"], "logprobs": lp, "finish_reason": None}
                    yield self._chunk([choice])
                elif event["type"] == "done":
                    key = "delta" if self.kind == "chat" else "text"
                    empty = {} if self.kind == "chat" else ""
                    yield self._chunk([{"index": index, key: empty, "logprobs": None,
                                        "finish_reason": event["finish_reason"]}])
            if self.include_usage:
                yield self._chunk([], self._usage())
            yield "data: [DONE]\n\n"
            done = True
        finally:
            if not done:  # the client went away (or the stream broke): free the rows now
                self.server.engine.cancel(self.seqs)
