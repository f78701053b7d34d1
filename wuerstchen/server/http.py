"""The HTTP connection layer under the app: uvicorn's h11 protocol with a header timeout.

uvicorn closes an idle kept-alive connection (`timeout_keep_alive`), but a client that opens a
connection and sends half of its request headers holds it open forever. `header_timeout_protocol`
gives each request `seconds` from its first byte (or from the connection, for the first) to
complete its headers; then the connection is closed.

    config = uvicorn.Config(app, http=header_timeout_protocol(10.0), limit_concurrency=256)
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def header_timeout_protocol(seconds: float) -> type[H11Protocol]:
    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:  # a request's headers are not complete yet
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(seconds, self._expired)

        def _expired(self) -> None:
            self._header_timer = None
            # Still waiting for the headers of a request that has begun: give up on it. (An idle
            # connection between requests is uvicorn's keep-alive timeout's to close.)
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol
