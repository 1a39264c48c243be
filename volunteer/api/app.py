"""The aiohttp application: bearer-token auth, a gate on generations at once, and the
routes `POST /v1/chat/completions`, `POST /v1/completions` and `GET /v1/models`.

A generation runs through the daemon's chat (`Chat`, the `ChatService`) as `volunteer
chat` does; streamed answers are server-sent events ending in `data: [DONE]`. A client
that goes away (a failed write, or aiohttp cancelling the handler) closes the reply's
generator, which ends the reply after its current token and closes its swarm session.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import pydantic
from aiohttp import web

from volunteer.api import errors
from volunteer.api.schema import Answer, ChatCompletionRequest, CompletionRequest
from volunteer.chat.stops import StopScanner
from volunteer.client.inference import SessionFailedError
from volunteer.control.messages import ChatMessage, ChatRequest, ChatStats, ChatText
from volunteer.errors import SettingsError, VolunteerError
from volunteer.models.errors import ContextLengthError

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 << 20
QUEUE_PER_SLOT = 8
"""Requests that may wait per generation slot; past that, a 429 at once."""
LOOPBACK = ("127.0.0.1", "::1")
WRITE_TIMEOUT_S = 30.0
"""A streaming client that takes none of its events for this long is let go: its
connection is dropped, and its generation slot and swarm session are freed."""


class Chat(Protocol):
    def chat(self, request: ChatRequest) -> AsyncIterator[Any]: ...


class Gate:
    """At most `slots` generations at once; others wait up to `timeout_s` for a turn."""

    def __init__(self, slots: int, timeout_s: float) -> None:
        self.slots = asyncio.Semaphore(slots)
        self.size = slots
        self.timeout_s = timeout_s
        self.waiting = 0
        self.active = 0
        self.requests = 0
        """Generations started (for `status`)."""

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        retry_s = max(1, math.ceil(self.timeout_s))
        if self.waiting >= self.size * QUEUE_PER_SLOT:
            raise errors.busy(retry_s)
        self.waiting += 1
        try:
            await asyncio.wait_for(self.slots.acquire(), self.timeout_s)
        except asyncio.TimeoutError:
            raise errors.busy(retry_s) from None
        finally:
            self.waiting -= 1
        self.active += 1
        self.requests += 1
        try:
            yield
        finally:
            self.active -= 1
            self.slots.release()


class Api:
    """The endpoint's state: what it serves, its token, its gate."""

    def __init__(
        self,
        chat: Chat,
        *,
        model: str,
        alias: str | None = None,
        adapters: Callable[[], list[str]],
        token: str,
        gate: Gate,
        open_on_loopback: bool = False,
        write_timeout_s: float = WRITE_TIMEOUT_S,
    ) -> None:
        """`open_on_loopback`: requests from this machine need no token (the owner's
        setting); one that sends a token must send the right one."""
        self.write_timeout_s = write_timeout_s
        self.chat = chat
        self.model = model
        self.alias = alias
        """Another name the served model answers to (the `model` setting as given)."""
        self.adapters = adapters
        self.token = token
        self.gate = gate
        self.open_on_loopback = open_on_loopback

    def application(self) -> web.Application:
        app = web.Application(
            client_max_size=MAX_BODY_BYTES, middlewares=[self._openai_errors, self._auth]
        )
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        return app

    def model_ids(self) -> list[str]:
        return [self.model, *(f"{self.model}:{name}" for name in self.adapters())]

    @web.middleware
    async def _openai_errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except errors.ApiError as exc:
            return exc.response()
        except web.HTTPException as exc:  # no such route, method or a body too large
            if exc.status < 400:
                raise
            return errors.ApiError(exc.status, exc.reason).response()

    @web.middleware
    async def _auth(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        given = request.headers.get("Authorization", "")
        if not given and self.open_on_loopback and request.remote in LOOPBACK:
            return await handler(request)
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise errors.unauthorized(
                "no API key: send `Authorization: Bearer <token>` (`volunteer api-token`)"
            )
        if not hmac.compare_digest(token.encode(), self.token.encode()):
            raise errors.unauthorized("the API key is wrong (`volunteer api-token` shows it)")
        return await handler(request)

    async def _models(self, request: web.Request) -> web.Response:
        data = [
            {"id": model, "object": "model", "created": 0, "owned_by": "volunteer-swarm"}
            for model in self.model_ids()
        ]
        return web.json_response({"object": "list", "data": data})

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        asked = _parse(ChatCompletionRequest, await _json(request))
        messages = [ChatMessage(role=m.plain_role(), content=m.text()) for m in asked.messages]
        return await self._generate(request, asked, messages, raw=False)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        asked = _parse(CompletionRequest, await _json(request))
        messages = [ChatMessage(role="user", content=asked.text)]
        return await self._generate(request, asked, messages, raw=True)

    async def _generate(
        self,
        request: web.Request,
        asked: ChatCompletionRequest | CompletionRequest,
        messages: list[ChatMessage],
        *,
        raw: bool,
    ) -> web.StreamResponse:
        adapter = self._adapter_of(asked.model)
        chat_request = ChatRequest(
            messages=messages,
            max_new_tokens=asked.token_limit,
            temperature=asked.temperature,
            top_p=asked.top_p,
            seed=asked.seed,
            adapter=adapter,
            raw=raw,
            stop=asked.stops,
        )
        answer = Answer(is_chat=not raw, model=asked.model)
        echo = asked.text if isinstance(asked, CompletionRequest) and asked.echo else ""
        async with self.gate.turn():
            replies = self.chat.chat(chat_request)
            try:
                first = await _next(replies)  # errors before any byte: a proper status
                if asked.stream:
                    sse = _Events(request, self.write_timeout_s)
                    return await _stream(sse, answer, replies, first, asked, echo)
                return await _whole(answer, replies, first, asked, echo)
            finally:
                await replies.aclose()  # ends the reply (and its session) if still running

    def _adapter_of(self, model: str) -> str | None:
        if model in (self.model, self.alias):
            return None
        base, _, name = model.rpartition(":")
        if base in (self.model, self.alias) and name in self.adapters():
            return name
        raise errors.model_not_found(model, self.model_ids())


async def _json(request: web.Request) -> Any:
    try:
        return json.loads(await request.read())
    except (ValueError, UnicodeDecodeError) as exc:
        raise errors.bad_request(f"the body is not JSON: {exc}", code="invalid_json") from None


def _parse(kind: type[pydantic.BaseModel], body: Any) -> Any:
    if not isinstance(body, dict):
        raise errors.bad_request("the body must be a JSON object")
    try:
        return kind.model_validate(body)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise errors.bad_request(f"{param}: {first['msg']}", param=param) from None


async def _next(replies: AsyncIterator[Any]) -> Any:
    """The reply's next message; the chat's errors as the API's."""
    try:
        return await anext(replies)
    except StopAsyncIteration:
        return None
    except ContextLengthError as exc:
        raise errors.bad_request(
            str(exc), param="messages", code="context_length_exceeded"
        ) from None
    except SessionFailedError as exc:
        raise errors.no_route(f"the swarm could not answer: {exc}") from None
    except SettingsError as exc:
        raise errors.bad_request(str(exc)) from None
    except VolunteerError as exc:
        raise errors.ApiError(503, str(exc), kind="server_error") from None


async def _texts(replies: AsyncIterator[Any], first: Any) -> AsyncIterator[str | ChatStats]:
    """The reply's text pieces, then its stats."""
    message = first
    while message is not None:
        if isinstance(message, ChatText):
            yield message.text
        elif isinstance(message, ChatStats):
            yield message
            return
        message = await _next(replies)


async def _whole(answer: Answer, replies: Any, first: Any, asked: Any, echo: str) -> web.Response:
    scanner, pieces, stats = StopScanner(asked.stops), [echo], None
    async for item in _texts(replies, first):
        if isinstance(item, ChatStats):
            stats = item
        else:
            pieces.append(scanner.push(item))
    pieces.append(scanner.flush())
    finish, prompt, tokens = _ending(stats)
    return web.json_response(answer.whole("".join(pieces), finish, prompt, tokens))


class _Events:
    """A server-sent event stream whose every write has a deadline."""

    def __init__(self, request: web.Request, timeout_s: float) -> None:
        self.request = request
        self.timeout_s = timeout_s
        self.response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )

    async def send(self, event: dict[str, Any] | str) -> None:
        """Raises ConnectionError when the client is gone or took nothing for the
        deadline (its connection is then dropped)."""
        data = event if isinstance(event, str) else json.dumps(event)
        try:
            await asyncio.wait_for(
                self.response.write(f"data: {data}\n\n".encode()), self.timeout_s
            )
        except TimeoutError:
            if self.request.transport is not None:
                self.request.transport.abort()
            raise ConnectionError(f"the client took no event for {self.timeout_s:g} s") from None


async def _stream(
    events: _Events, answer: Answer, replies: Any, first: Any, asked: Any, echo: str
) -> web.StreamResponse:
    response, send = events.response, events.send
    await response.prepare(events.request)
    scanner, stats = StopScanner(asked.stops), None
    try:
        await send(answer.chunk("" if answer.is_chat else echo, first=True))
        async for item in _texts(replies, first):
            if isinstance(item, ChatStats):
                stats = item
            elif text := scanner.push(item):
                await send(answer.chunk(text))
        if tail := scanner.flush():
            await send(answer.chunk(tail))
        finish, prompt, tokens = _ending(stats)
        await send(answer.chunk(None, finish))
        if asked.include_usage:
            await send(answer.usage_chunk(prompt, tokens))
        await send("[DONE]")
    except errors.ApiError as exc:  # after the head went out: said in the stream
        await send(exc.body())
    except ConnectionError as exc:  # the caller's `aclose` ends the reply
        logger.info("an API client went away mid-stream (%s): its reply ends", exc)
        return response
    await response.write_eof()
    return response


def _ending(stats: ChatStats | None) -> tuple[str, int, int]:
    if stats is None:
        return "stop", 0, 0
    return stats.finish, stats.prompt_tokens, stats.tokens
