"""The daemon service that serves the OpenAI API (`volunteer.api.app`) where the `api`
setting says, with the token of `volunteer.daemon.api_token`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiohttp import web

from volunteer.api.app import Api, Chat, Gate
from volunteer.control.status_messages import ApiStatus
from volunteer.daemon.api_token import load_or_create_api_token
from volunteer.daemon.block_service import BlockService
from volunteer.errors import VolunteerError
from volunteer.model_cache.served_model import open_model
from volunteer.paths import Paths
from volunteer.settings import Settings
from volunteer.settings.spec import split_api_address

logger = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_S = 5.0


class ApiService:
    def __init__(
        self,
        settings: Settings,
        paths: Paths,
        chat: Chat,
        blocks: BlockService,
        adapters: Callable[[], list[str]],
    ) -> None:
        self._settings = settings
        self._paths = paths
        self._chat = chat
        self._blocks = blocks
        self._adapters = adapters
        self._runner: web.AppRunner | None = None
        self.gate = Gate(settings.api_max_requests, settings.api_queue_timeout_s)
        self.url: str | None = None

    async def start(self) -> None:
        settings = self._settings
        if settings.api is None:
            return
        token = load_or_create_api_token(self._paths)
        # The model's id is its name in the swarm, whether `model` named it or a path did.
        served = self._blocks.model or await asyncio.to_thread(
            open_model, settings.model, self._paths.models_dir
        )
        api = Api(
            self._chat,
            model=served.swarm_name,
            alias=settings.model,
            adapters=self._adapters,
            token=token.value,
            gate=self.gate,
            open_on_loopback=settings.api_open_on_loopback,
        )
        # A client that hangs up cancels its handler: its generation ends with it.
        runner = web.AppRunner(api.application(), handler_cancellation=True, access_log=None)
        await runner.setup()
        host, port = split_api_address(settings.api)
        try:
            await web.TCPSite(runner, host, port, shutdown_timeout=SHUTDOWN_TIMEOUT_S).start()
        except OSError as exc:
            await runner.cleanup()
            raise VolunteerError(f"the API cannot listen on {settings.api}: {exc}") from None
        self._runner = runner
        self.url = f"http://{settings.api}/v1"
        logger.info("serving the OpenAI API at %s (token: `volunteer api-token`)", self.url)

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    def status(self) -> ApiStatus:
        return ApiStatus(
            api_url=self.url, api_requests=self.gate.requests, api_active=self.gate.active
        )
