"""A hub serving on its own event-loop thread, for `pointsx demo` and the tests.

The hub is a `grpc.aio` server; callers here are synchronous (the SDK's blocking client), so the
server gets a loop of its own and the caller keeps its thread.
"""

from __future__ import annotations

import asyncio
import threading

import grpc

from exchange.hub import Hub
from exchange.rpc.server import TlsFiles, create_server, mark_serving


class BackgroundHub:
    def __init__(self, hub: Hub, address: str = "127.0.0.1:0", *, tls: TlsFiles | None = None) -> None:
        self.hub = hub
        self._tls = tls
        self._address = address
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._failure: BaseException | None = None
        self._server: grpc.aio.Server | None = None
        self.port = 0
        self._thread = threading.Thread(target=self._run, name="pointsx-hub", daemon=True)
        self._thread.start()
        if not self._started.wait(30):
            raise RuntimeError("the hub did not start within 30 s")
        if self._failure is not None:
            raise RuntimeError(f"the hub failed to start: {self._failure}") from self._failure
        self.target = f"{address.rsplit(':', 1)[0]}:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._server, self.port = create_server(self.hub, self._address, tls=self._tls)
            await self._server.start()
            await mark_serving(self._server)

        try:
            self._loop.run_until_complete(start())
        except BaseException as exc:  # reported to the constructor's thread
            self._failure = exc
            self._started.set()
            return
        self._started.set()
        self._loop.run_forever()

    def stop(self) -> None:
        if self._server is not None and self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._server.stop(grace=1), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()
        self.hub.close()
        self.hub.engine.dispose()
