"""Talking to a backend: one persistent ClientSession, errors mapped at the boundary.

Callers see only `errors.GatewayError`s. The split that matters downstream is
`UpstreamUnavailable` (nothing was received: safe to send again after the
backend comes back) against every other failure (something may have happened).
"""

from __future__ import annotations

import asyncio
import ssl
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Mapping

import aiohttp

from ..config import BackendConfig
from ..errors import GatewayError, UpstreamError, UpstreamTimeout, UpstreamUnavailable

# Hop-by-hop headers (RFC 9110 7.6.1) and those aiohttp must compute itself.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
    "transfer-encoding", "upgrade", "host", "content-length", "accept-encoding", "content-encoding",
})
CLIENT_KEYS = frozenset({"x-api-key", "authorization"})
# What a backend needs of the client's headers: the body's type, what answer it accepts, and the
# Anthropic API's version and beta features (an Anthropic-compatible backend reads them). Nothing
# else goes: a browser's Origin and Cookie, the SDK's telemetry (x-stainless-*), Claude Code's
# session and agent ids, proxies' X-Forwarded-* are the gateway's business, not the backend's.
FORWARDED = frozenset({"content-type", "accept", "anthropic-version", "anthropic-beta"})


def backend_auth(backend: BackendConfig) -> dict[str, str]:
    """The backend's own key, on every request to it (/slots and /props included)."""
    if not backend.api_key:
        return {}
    return {"x-api-key": backend.api_key, "Authorization": f"Bearer {backend.api_key}"}


def request_headers(client: Mapping[str, str], backend: BackendConfig,
                    gateway_key: str | None = None) -> dict[str, str]:
    """The client's headers for the backend: only those in FORWARDED, the client's key only when
    asked (and never the gateway's own key), the backend's key added."""
    out = {}
    for k, v in client.items():
        lk = k.lower()
        if lk not in FORWARDED and not (lk in CLIENT_KEYS and backend.forward_client_key):
            continue
        if lk in CLIENT_KEYS and gateway_key and gateway_key in v:
            continue
        out[k] = v
    out.update(backend_auth(backend))
    # Byte-faithful SSE passthrough needs the stream uncompressed.
    out["Accept-Encoding"] = "identity"
    out.setdefault("Content-Type", "application/json")
    return out


def response_headers(upstream: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in upstream.items() if k.lower() not in HOP_BY_HOP and k.lower() != "date"
            and k.lower() != "server"}


class UpstreamClient:
    def __init__(self, connect_timeout: float = 5.0) -> None:
        self._connect_timeout = connect_timeout
        self._session: aiohttp.ClientSession | None = None
        self._ssl_contexts: dict[str, ssl.SSLContext] = {}

    async def start(self) -> None:
        # No total timeout: a first prefill on a big model takes minutes, and
        # the slot queue, not a socket timer, decides how long a request may live.
        # force_close: llama-server (cpp-httplib) drops idle keep-alive
        # connections after 5 s, and a POST on such a stale connection fails in
        # a way that looks like a crash. A new loopback connection costs ~0.1 ms.
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout),
            auto_decompress=False,
            connector=aiohttp.TCPConnector(limit=0, force_close=True),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("UpstreamClient.start() was not called")
        return self._session

    def _timeout(self, backend: BackendConfig, total: float | None) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=total or None,
                                     sock_connect=backend.connect_timeout_seconds or self._connect_timeout,
                                     sock_read=backend.read_timeout_seconds or None)

    def _ssl(self, backend: BackendConfig) -> ssl.SSLContext | bool:
        """The system's trust for https, or the backend's own CA (read once)."""
        if not backend.ca_file:
            return True
        ctx = self._ssl_contexts.get(backend.ca_file)
        if ctx is None:
            ctx = self._ssl_contexts[backend.ca_file] = ssl.create_default_context(cafile=backend.ca_file)
        return ctx

    @asynccontextmanager
    async def post(self, backend: BackendConfig, path: str, data: bytes, headers: Mapping[str, str],
                   *, timeout: float | None = None) -> AsyncIterator[aiohttp.ClientResponse]:
        """POST and yield the response with its headers read; leaving the block
        closes the connection unless the body was read to the end, so a
        backend stops generating for a client that is gone."""
        url = backend.url + path
        try:
            resp = await self.session.post(url, data=data, headers={**headers, **backend_auth(backend)},
                                           timeout=self._timeout(backend, timeout), ssl=self._ssl(backend))
        except BaseException as exc:
            raise map_error(exc, backend) from exc
        try:
            yield resp
        finally:
            if resp.content.at_eof():
                resp.release()
            else:
                resp.close()

    async def get_text(self, backend: BackendConfig, path: str, *, timeout: float, limit: int) -> tuple[int, str]:
        """GET `path`: its status and text (at most `limit` bytes, else a GatewayError)."""
        try:
            async with self.session.get(backend.url + path, headers=backend_auth(backend),
                                        timeout=self._timeout(backend, timeout), ssl=self._ssl(backend)) as resp:
                return resp.status, (await read_whole(resp, limit, backend)).decode("utf-8", "replace")
        except GatewayError:
            raise
        except BaseException as exc:
            raise map_error(exc, backend) from exc

    async def get_json(self, backend: BackendConfig, path: str, *, timeout: float) -> tuple[int, Any]:
        try:
            async with self.session.get(backend.url + path, headers=backend_auth(backend),
                                        timeout=self._timeout(backend, timeout), ssl=self._ssl(backend)) as resp:
                raw = await resp.read()
                try:
                    return resp.status, await resp.json(content_type=None) if raw else None
                except ValueError:
                    return resp.status, None
        except BaseException as exc:
            raise map_error(exc, backend) from exc


async def read_whole(resp: aiohttp.ClientResponse, limit: int, backend: BackendConfig) -> bytes:
    """The whole answer body, however many reads it takes; a cut one is a failure, never an answer."""
    buf = bytearray()
    try:
        async for chunk in resp.content.iter_any():
            buf += chunk
            if len(buf) > limit:
                raise UpstreamError(f"backend {backend.name!r} answer is over {limit} bytes (the gateway's limit)")
    except (aiohttp.ClientError, OSError) as exc:
        # The backend died mid-answer; nothing of it reached the client.
        raise UpstreamUnavailable(f"backend {backend.name!r} closed the connection mid-answer after {len(buf)} "
                                  f"bytes: {exc.__class__.__name__}") from exc
    return bytes(buf)


async def chunks(resp: aiohttp.ClientResponse, backend: BackendConfig) -> AsyncIterator[bytes]:
    """The answer body as it arrives; a broken connection (reset, payload error) is a GatewayError."""
    try:
        async for chunk in resp.content.iter_any():
            yield chunk
    except Exception as exc:  # noqa: BLE001 - whatever breaks a read, the backend is gone
        mapped = map_error(exc, backend)
        if isinstance(mapped, GatewayError):
            raise mapped from exc
        raise UpstreamError(f"backend {backend.name!r}: {exc.__class__.__name__}: {exc}") from exc


async def drain(resp: aiohttp.ClientResponse, timeout: float) -> bool:
    """Read what is left of an answer (normally nothing); True when it ended within `timeout`, so
    the backend is done with the request."""
    try:
        async with asyncio.timeout(timeout):
            while await resp.content.readany():
                pass
        return True
    except (TimeoutError, aiohttp.ClientError, OSError):
        return False


def map_error(exc: BaseException, backend: BackendConfig) -> BaseException:
    """The one place where aiohttp's errors become ours; cancellation passes through."""
    if isinstance(exc, asyncio.CancelledError) or not isinstance(exc, Exception):
        return exc
    where = f"backend {backend.name!r} ({backend.url})"
    if isinstance(exc, (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError, ssl.SSLError)):
        # It answers, but cannot be trusted: no retry will change that.
        return UpstreamError(f"{where}: TLS failed ({exc}); if it uses a private CA, set its ca_file")
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        # Not connected within connect_timeout_seconds: nothing was sent, so it is safe to send
        # again (on another backend of a pool), like a refused connection.
        return UpstreamUnavailable(f"{where}: no connection within the connect timeout")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamUnavailable(f"{where} refused the connection: {exc.os_error or exc}")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return UpstreamUnavailable(f"{where} closed the connection before answering")
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return UpstreamTimeout(f"{where} timed out")
    if isinstance(exc, (aiohttp.ClientOSError, ConnectionError)):
        return UpstreamUnavailable(f"{where}: connection failed: {exc}")
    if isinstance(exc, aiohttp.ClientError):
        return UpstreamError(f"{where}: {exc.__class__.__name__}: {exc}")
    return exc
