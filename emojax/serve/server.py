"""Running the app: uvicorn, with SIGTERM (or SIGINT) draining it first (ServeState.drain: 503 to new requests,
those in flight finish, the engine shuts down, the audit log is fsynced) and the process then exiting 0."""

from __future__ import annotations

import asyncio
import logging

import uvicorn
from starlette.applications import Starlette

from emojax.serve.app import ServeState

log = logging.getLogger("emojax.serve")


class _DrainingServer(uvicorn.Server):
    """uvicorn, except that the first SIGTERM or SIGINT drains the app (503 to new requests, in-flight ones
    finish) before uvicorn stops; a second signal is uvicorn's own (immediate) exit."""

    def __init__(self, config: uvicorn.Config, state: ServeState):
        super().__init__(config)
        self.state = state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signalled = False
        self._task: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        if self._loop is None or self._signalled:
            return super().handle_exit(sig, frame)
        self._signalled = True
        log.info("signal %d: draining (new requests get 503)", sig)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._task = self._loop.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            await self.state.drain()
        finally:
            self.should_exit = True


def run_server(app: Starlette, sockets=None, log_level: str = "info") -> None:
    """Serves `app` with uvicorn on serve.host:serve.port (or on the given listening `sockets`) until SIGTERM or
    SIGINT, which drain it (ServeState.drain) before the process exits."""
    state: ServeState = app.state.serve
    config = uvicorn.Config(app, host=state.config.host, port=state.config.port, log_level=log_level,
                            timeout_graceful_shutdown=5, lifespan="on")
    _DrainingServer(config, state).run(sockets=sockets)
