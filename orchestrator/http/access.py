"""Who may use the gateway: the user, not a web page in their browser, nor the network.

Three checks, in one middleware, before any handler runs:

- Browser protection, on every bind. A page the user visits can send requests
  to 127.0.0.1 too. A request whose `Origin` is a web origin other than the
  gateway's own (CSRF), or whose `Host` names anything but the gateway's own
  address or a loopback name (DNS rebinding), gets 403. Claude Code, curl and
  the SDKs send no `Origin`.
- The API key, when one is configured (required off loopback): `x-api-key` or
  `Authorization: Bearer`, compared in constant time; 401 without it.
- `/internal/process-event` takes only supervisord's event listener, which
  proves itself with the secret `orchestrator up` handed to both; 403 without it.

Keys never reach a log: refusals log the client's address and the reason only.
"""

from __future__ import annotations

import hmac
import logging
import socket
from dataclasses import dataclass
from typing import Callable

from aiohttp import web

from ..config import GatewayConfig, is_loopback_host
from ..errors import AuthenticationFailed, Forbidden, GatewayError

log = logging.getLogger(__name__)

INTERNAL_PREFIX = "/internal/"
DASHBOARD_PREFIX = "/dashboard"
SECRET_HEADER = "X-Orchestrator-Secret"
# Claude Code's start-up reachability probes: answered without a key (they say
# only that an orchestrator listens here, which the open port says already).
PROBES = frozenset({"/", "/api/hello"})
_WILDCARD = {"", "0.0.0.0", "::", "*"}


def _machine_names() -> set[str]:
    names = {socket.gethostname().lower()}
    try:
        names.add(socket.getfqdn().lower())
    except OSError:
        pass
    return names


@dataclass(frozen=True)
class AccessPolicy:
    api_key: str | None
    events_secret: str | None
    allowed_origins: frozenset[str]
    allowed_hosts: frozenset[str]

    @classmethod
    def from_config(cls, g: GatewayConfig, events_secret: str | None) -> "AccessPolicy":
        hosts = {h.lower() for h in g.allowed_hosts} | _machine_names()
        if g.host not in _WILDCARD:
            hosts.add(g.host.strip("[]").lower())
        return cls(api_key=g.api_key, events_secret=events_secret,
                   allowed_origins=frozenset(o.rstrip("/").lower() for o in g.allowed_origins),
                   allowed_hosts=frozenset(hosts))

    def host_allowed(self, request: web.Request) -> bool:
        host = request.headers.get("Host")
        if host is None:
            return True  # HTTP/1.0 without Host: not a browser
        name = _host_name(host)
        if is_loopback_host(name) or name in self.allowed_hosts:
            return True
        # The address the client connected to, by number (a bind on 0.0.0.0 reached as 192.168.1.5).
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        return bool(sockname) and name == str(sockname[0]).lower()

    def origin_allowed(self, request: web.Request) -> bool:
        origin = request.headers.get("Origin")
        if origin is None:
            return True
        origin = origin.rstrip("/").lower()
        own = f"{request.scheme}://{request.headers.get('Host', '')}".lower()
        return origin == own or origin in self.allowed_origins

    def key_error(self, request: web.Request) -> GatewayError | None:
        if self.api_key is None:
            return None
        # Claude Code sends both when a person has ANTHROPIC_API_KEY set as well as the
        # gateway's key as ANTHROPIC_AUTH_TOKEN: either one matching lets it in.
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        given = [v for v in (request.headers.get("x-api-key"), token.strip() if scheme.lower() == "bearer" else None)
                 if v is not None]
        if not given:
            return AuthenticationFailed("missing API key: this gateway needs one, in x-api-key or "
                                        "Authorization: Bearer (orchestrator env prints it)")
        want = self.api_key.encode()
        # Every candidate compared, so the time taken says nothing about which matched.
        matches = [hmac.compare_digest(v.encode("utf-8", "surrogateescape"), want) for v in given]
        return None if any(matches) else AuthenticationFailed("invalid API key")

    def secret_ok(self, request: web.Request) -> bool:
        given = request.headers.get(SECRET_HEADER)
        return (self.events_secret is not None and given is not None
                and hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self.events_secret.encode()))


def _host_name(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _dashboard(path: str) -> bool:
    # The dashboard checks the key itself (page.py): a browser sends a login cookie, not a header.
    return path == DASHBOARD_PREFIX or path.startswith(DASHBOARD_PREFIX + "/")


def access_middleware(policy: AccessPolicy, on_refusal: Callable[[str], None]):
    @web.middleware
    async def check_access(request: web.Request, handler) -> web.StreamResponse:
        def refuse(reason: str, err: GatewayError) -> GatewayError:
            on_refusal(reason)
            log.warning("refused %s %s from %s: %s", request.method, request.path, request.remote, err.message)
            return err

        if not policy.host_allowed(request):
            raise refuse("forbidden", Forbidden(
                f"Host {request.headers.get('Host', '')[:100]!r} is not this gateway's address: a web page may not "
                f"reach it under another name (add the name to gateway.allowed_hosts if it is yours)"))
        if not policy.origin_allowed(request):
            raise refuse("forbidden", Forbidden(
                f"requests from web pages are refused (Origin {request.headers.get('Origin', '')[:100]!r}); "
                f"add the origin to gateway.allowed_origins if it is yours"))
        if request.path.startswith(INTERNAL_PREFIX):
            if not policy.secret_ok(request):
                raise refuse("forbidden", Forbidden(f"{request.path} is for supervisord's event listener only"))
        elif request.path not in PROBES and not _dashboard(request.path):
            err = policy.key_error(request)
            if err is not None:
                raise refuse("unauthorized", err)
        return await handler(request)

    return check_access
