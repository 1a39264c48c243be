"""The API's HTTP side on a real aiohttp server (loopback): auth, the model list with the
stored adapters, OpenAI-shaped errors for routes and methods, and the gate's bounds."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from volunteer.api.app import Api, Gate
from volunteer.api.errors import ApiError
from volunteer.control.messages import ChatRequest, ChatText

TOKEN = "vol-" + "t" * 40


class NoChat:
    """Chat for routes that never generate: any call fails the test."""

    def chat(self, request: ChatRequest) -> AsyncIterator[Any]:
        raise AssertionError("no generation was asked for")


def _api(**options: Any) -> Api:
    return Api(
        NoChat(),
        model="smollm2",
        alias="/models/smollm2",
        adapters=lambda: ["tuned"],
        token=TOKEN,
        gate=Gate(1, 0.2),
        **options,
    )


def _with_client(api: Api, check: Callable[[TestClient], Awaitable[None]]) -> None:
    async def main() -> None:
        async with TestClient(TestServer(api.application(), host="127.0.0.1")) as client:
            await check(client)

    asyncio.run(main())


def test_models_need_the_token_and_list_the_adapters() -> None:
    async def check(client: TestClient) -> None:
        missing = await client.get("/v1/models")
        assert missing.status == 401
        assert (await missing.json())["error"]["code"] == "invalid_api_key"
        wrong = await client.get("/v1/models", headers={"Authorization": "Bearer vol-x"})
        assert wrong.status == 401
        right = await client.get("/v1/models", headers={"Authorization": f"Bearer {TOKEN}"})
        ids = [model["id"] for model in (await right.json())["data"]]
        assert ids == ["smollm2", "smollm2:tuned"]

    _with_client(_api(), check)


def test_loopback_may_go_without_the_token_only_when_the_owner_says() -> None:
    async def check(client: TestClient) -> None:
        assert (await client.get("/v1/models")).status == 200
        wrong = await client.get("/v1/models", headers={"Authorization": "Bearer vol-x"})
        assert wrong.status == 401  # a token sent must be the right one

    _with_client(_api(open_on_loopback=True), check)


def test_routes_and_methods_that_do_not_exist_answer_in_openais_shape() -> None:
    async def check(client: TestClient) -> None:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        nowhere = await client.get("/v1/engines", headers=auth)
        assert nowhere.status == 404 and "error" in await nowhere.json()
        method = await client.get("/v1/chat/completions", headers=auth)
        assert method.status == 405 and "error" in await method.json()
        listed = await client.post("/v1/chat/completions", headers=auth, data=b"[1, 2]")
        assert listed.status == 400
        assert (await listed.json())["error"]["message"] == "the body must be a JSON object"
        huge = await client.post("/v1/completions", headers=auth, data=io.BytesIO(b"x" * (5 << 20)))
        assert huge.status == 413 and "error" in await huge.json()
        gone = await client.post(
            "/v1/completions", headers=auth, json={"model": "gpt-4", "prompt": "x"}
        )
        assert gone.status == 404 and (await gone.json())["error"]["code"] == "model_not_found"

    _with_client(_api(), check)


def test_model_ids_name_the_model_its_alias_or_one_of_its_adapters() -> None:
    api = _api()
    assert api._adapter_of("smollm2") is None
    assert api._adapter_of("/models/smollm2") is None
    assert api._adapter_of("smollm2:tuned") == "tuned"
    for unknown in ("smollm2:other", "other:tuned", "gpt-4"):
        with pytest.raises(ApiError) as refused:
            api._adapter_of(unknown)
        assert refused.value.status == 404


def test_the_gate_queues_then_refuses_with_retry_after() -> None:
    async def main() -> None:
        gate = Gate(1, 0.2)
        async with gate.turn():
            assert gate.active == 1
            with pytest.raises(ApiError) as busy:
                async with gate.turn():
                    pass
            assert busy.value.status == 429 and busy.value.retry_after_s == 1
        async with gate.turn():  # free again
            assert gate.requests == 2
        full = Gate(1, 5.0)
        async with full.turn():
            waiters = [asyncio.ensure_future(_enter(full)) for _ in range(8)]
            await asyncio.sleep(0.05)
            with pytest.raises(ApiError):  # past 8 waiting per slot: at once
                async with full.turn():
                    pass
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
        assert full.waiting == 0 and full.active == 0

    asyncio.run(main())


async def _enter(gate: Gate) -> None:
    async with gate.turn():
        pass


class EndlessChat:
    """Chat whose replies never end, in large pieces; it notes each reply it closed."""

    def __init__(self) -> None:
        self.closed = 0

    async def chat(self, request: ChatRequest) -> AsyncIterator[Any]:
        try:
            while True:
                yield ChatText(text="x" * 65536)
                await asyncio.sleep(0)
        finally:
            self.closed += 1


def test_a_streaming_client_that_reads_nothing_is_let_go_and_frees_its_slot() -> None:
    chat = EndlessChat()
    api = Api(
        chat,
        model="smollm2",
        adapters=list,
        token=TOKEN,
        gate=Gate(1, 30.0),
        write_timeout_s=0.5,
    )
    body = json.dumps(
        {"model": "smollm2", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()

    async def check(client: TestClient) -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", client.port)
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        writer.write(head.encode() + body)
        await writer.drain()  # and then reads nothing
        deadline = asyncio.get_running_loop().time() + 30
        while not chat.closed and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        assert chat.closed == 1  # its reply (and swarm session) ended
        assert api.gate.active == 0  # and its slot is free for the next client
        writer.close()

    _with_client(api, check)
