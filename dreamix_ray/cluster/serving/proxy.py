"""What Serve's HTTP proxy needs from us: its options (idle timeout), a header timeout, loopback-only Ray.

uvicorn (under Serve's proxy) closes idle keep-alive connections (`keep_alive_timeout_s`, from
HTTPOptions) but has no deadline for a request's headers: a client that opens a connection and
sends half a request line holds it forever. Serve calls `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`
in every proxy process before it starts uvicorn; `install` there makes uvicorn's "auto" HTTP
protocol a subclass with that deadline. Body deadlines are per request, in uploads.py.
"""

from __future__ import annotations

import json
import os

import ray
import uvicorn.config
from ray.serve._private import replica as serve_replica
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from .settings import TIMEOUT_ENV, ServeSettings, is_loopback


def http_options(settings: ServeSettings, host: str, port: int) -> dict:
    return {"host": host, "port": port, "keep_alive_timeout_s": settings.idle_timeout_s}


class HeaderTimeoutProtocol(AutoHTTPProtocol):
    """uvicorn's HTTP protocol, closing a connection whose request headers are not complete in time (counted
    from the connection, or from the first byte of the next request on a kept-alive one)."""

    header_timeout_s = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._timer is None and (self.cycle is None or self.cycle.response_complete):
            self._arm()  # the first bytes of the next request (the keep-alive timer covered the wait for them)
        self._got_bytes = True
        super().data_received(data)
        if self._timer is not None and self.cycle is not self._waiting_after:  # headers parsed: a new cycle
            self._timer.cancel()
            self._timer = None

    def connection_lost(self, exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._waiting_after, self._got_bytes = self.cycle, False
        self._timer = self.loop.call_later(self.header_timeout_s, self._late)

    def _late(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self._got_bytes:  # a silent connection (a browser's preconnect) is closed without an answer
            body = json.dumps({"error": "timeout", "detail": f"the request headers did not arrive within "
                                                             f"{self.header_timeout_s:g} s"}).encode()
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        self.transport.close()


def install() -> list:
    """Serve's proxy callback: header timeouts on every connection of this proxy; no middlewares."""
    HeaderTimeoutProtocol.header_timeout_s = float(os.environ.get(TIMEOUT_ENV, HeaderTimeoutProtocol.header_timeout_s))
    uvicorn.config.HTTP_PROTOCOLS["auto"] = f"{__name__}:HeaderTimeoutProtocol"
    return []


def bind_replica_grpc_to_loopback() -> None:
    """On a loopback-only node, bind this Serve replica's inter-deployment gRPC server to loopback too.

    Ray 2.60 binds it to "[::]:0" with no setting (ray/serve/_private/replica.py, `_on_initialized`), so
    `dreamix serve --host 127.0.0.1` would still listen on every interface; the replica's constructor calls
    this before Serve starts that server. tests/test_serve_hardening.py lists the sockets to hold it.
    """
    node_ip = ray.util.get_node_ip_address()
    original = serve_replica.add_port_to_grpc_server
    if not is_loopback(node_ip) or getattr(original, "loopback", False):
        return

    def add_port(server, address: str):
        if address.startswith("[::]:"):
            address = f"{node_ip}:{address[5:]}"
        return original(server, address)

    add_port.loopback = True
    serve_replica.add_port_to_grpc_server = add_port
