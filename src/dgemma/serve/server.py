"""uvicorn with connection limits: a cap on connections, a deadline for reading each request, keep-alive reaping,
and a response for clients that half-close their socket after sending a request."""

from __future__ import annotations

import asyncio

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..limits import ConnectionLimits


class _Protocol(H11Protocol):
    """h11 protocol with a read deadline per request and half-close support.

    uvicorn arms no timer while it waits for a request (a client that sends half a request line would hold its
    socket forever): here a timer runs from the moment a request is expected until it has fully arrived. A client
    that shuts down its sending side after a complete request still gets the response (TCP allows it; asyncio's
    default closes the transport on EOF)."""

    read_timeout: float = 10.0
    _read_timer: asyncio.TimerHandle | None = None
    _half_closed = False

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED):
            self._disarm()  # the whole request is here

    def on_response_complete(self) -> None:
        if self._half_closed:
            self.transport.close()  # the client sends nothing more: done after this response
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is not h11.DONE:
            self._arm()  # waiting for the next request on this connection

    def eof_received(self) -> bool | None:
        if self.cycle is not None and not self.cycle.response_complete and self.conn.their_state is h11.DONE:
            self._half_closed = True
            return True  # keep the transport open for writing the response
        return None  # idle or mid-request: close

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._read_timer = self.loop.call_later(self.read_timeout, self._read_timed_out)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if not self.transport.is_closing():
            self.transport.close()  # a request in flight sees a disconnect


def make_server(app, host: str, port: int, limits: ConnectionLimits | None = None,
                log_level: str = "warning") -> uvicorn.Server:
    limits = limits or ConnectionLimits()
    protocol = type("Protocol", (_Protocol,), {"read_timeout": limits.read_timeout})
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol, ws="none",
                            lifespan="on", limit_concurrency=limits.max_connections,
                            timeout_keep_alive=limits.keep_alive_timeout,
                            h11_max_incomplete_event_size=limits.max_header_bytes)
    return uvicorn.Server(config)
