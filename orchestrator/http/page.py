"""`/dashboard`: one live page served by the gateway, its JSON state, its login and Cancel.

Access follows the gateway's rules (access.py keeps checking Host and Origin on every request here); the
key, which a browser cannot send as a header, is replaced by a login:

- `orchestrator dashboard` prints `/dashboard/login?t=TICKET`. A ticket is `expiry.nonce.mac`, the mac
  an HMAC of both under the gateway's key, so the CLI that can read the key can make one and nobody
  else can; it lives `TICKET_SECONDS` and is taken once. Which were taken is kept in memory only, so a ticket
  made before this process started is refused: a restart cannot make a taken one good again.
- The login answers with a cookie `expiry.mac` (HttpOnly, SameSite=Strict, Path=/dashboard), checked
  by its HMAC alone, so it survives a gateway restart and needs no server-side store.
- Cancel is a POST carrying `X-Dashboard-CSRF`, a token the state JSON hands to the page: a foreign page
  can neither read it (no CORS, and its Origin is refused) nor send the header without a preflight.

Without a key (loopback, the default) the page and its data are open to whatever may use the gateway.
Every answer here carries a strict Content-Security-Policy: scripts and styles from the package only.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from .. import __version__
from ..backends import identity
from ..backends.gateway import GATEWAY, Backend, Gateway
from ..backends.inflight import Entry
from ..errors import (
    AuthenticationFailed,
    Forbidden,
    GatewayError,
    NotFound,
    error_for_status,
)
from .history import History

WEB = Path(__file__).resolve().parent / "web"
STATIC = {"dashboard.js": "application/javascript", "dashboard.css": "text/css", "favicon.svg": "image/svg+xml"}
PREFIX = "/dashboard"
COOKIE = "orchestrator_dashboard"
CSRF_HEADER = "X-Dashboard-CSRF"
TICKET_SECONDS = 120
SESSION_SECONDS = 12 * 3600
SLOTS_TIMEOUT = 1.0
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY", "Cache-Control": "no-store"}

DASHBOARD = web.AppKey("dashboard", object)
# Where the middleware leaves a `/v1/messages` request's entry for its handler (aiohttp 3.14 types
# request keys; an older one takes a string).
ENTRY = web.RequestKey("entry", Entry) if hasattr(web, "RequestKey") else "orchestrator.entry"


def _mac(key: str, *parts: str) -> str:
    return hmac.new(key.encode(), ":".join(parts).encode(), hashlib.sha256).hexdigest()


def make_ticket(key: str, now: float | None = None) -> str:
    """A one-time login ticket for the dashboard, good for TICKET_SECONDS (made by the CLI)."""
    exp = str(int((time.time() if now is None else now) + TICKET_SECONDS))
    nonce = secrets.token_hex(12)
    return f"{exp}.{nonce}.{_mac(key, 'dashboard-ticket', exp, nonce)}"


def login_url(gateway_url: str, key: str | None) -> str:
    return f"{gateway_url}{PREFIX}/login?t={make_ticket(key)}" if key else f"{gateway_url}{PREFIX}"


class Dashboard:
    """The page's server-side state: who is logged in is in the cookie; this holds the rest."""

    def __init__(self, key: str | None, history: History | None = None):
        self.key = key
        self.history = history or History()
        self.taken: dict[str, float] = {}  # ticket nonces taken, until they expire
        self.started = time.time()  # a ticket made before this may have been taken by the last process
        # Without a key the CSRF token comes from a per-process secret (a restart: the page reads a new one).
        self.secret = key or secrets.token_hex(32)
        self.slots: dict[str, tuple[float, Any]] = {}

    # ---- login ----
    def take_ticket(self, ticket: str) -> bool:
        if self.key is None:
            return True
        exp, _, rest = ticket.partition(".")
        nonce, _, mac = rest.partition(".")
        now = time.time()
        if not (exp.isdigit() and nonce and mac and now < int(exp) <= now + TICKET_SECONDS):
            return False
        if int(exp) - TICKET_SECONDS + 1 < self.started:  # made (to the second) before this process
            return False
        if not hmac.compare_digest(mac, _mac(self.key, "dashboard-ticket", exp, nonce)):
            return False
        self.taken = {n: e for n, e in self.taken.items() if e > now}
        if nonce in self.taken or len(self.taken) > 10_000:
            return False
        self.taken[nonce] = int(exp)
        return True

    def session_cookie(self) -> str:
        exp = str(int(time.time() + SESSION_SECONDS))
        return f"{exp}.{_mac(self.key or self.secret, 'dashboard-session', exp)}"

    def logged_in(self, request: web.Request) -> bool:
        if self.key is None:
            return True
        given = request.headers.get("x-api-key")
        if given is not None:  # curl, the bench: the gateway's own key works here too
            return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self.key.encode())
        exp, _, mac = request.cookies.get(COOKIE, "").partition(".")
        return (exp.isdigit() and time.time() < int(exp)
                and hmac.compare_digest(mac, _mac(self.key, "dashboard-session", exp)))

    def csrf(self, request: web.Request) -> str:
        return _mac(self.secret, "dashboard-csrf", request.cookies.get(COOKIE, ""))

    # ---- what the page shows ----
    async def slots_of(self, backend: Backend) -> Any:
        """Its engine's slots (llama-server's `/slots`), at most once a second per backend however many
        pages poll."""
        now = time.monotonic()
        name = backend.name
        cached = self.slots.get(name)
        if cached is not None and now - cached[0] < 1.0:
            return cached[1]
        try:
            value = await backend.engine.slots(SLOTS_TIMEOUT)
        except (GatewayError, asyncio.TimeoutError, OSError):
            value = None
        self.slots[name] = (now, value)
        return value


def _backend_views(gw: Gateway) -> list[tuple[Backend, dict[str, Any]]]:
    """Each backend and what /health says of it."""
    return [(b, {**b.health.snapshot(), **gw.slot_use(b), **gw.kv_view(b)}) for b in gw.backends.values()]


def _slot_view(slot: Any) -> dict[str, Any]:
    """The few fields of a llama-server slot the page shows (names differ across versions)."""
    if not isinstance(slot, dict):
        return {}
    nt = slot.get("next_token") if isinstance(slot.get("next_token"), list) else [{}]
    nt = nt[0] if nt and isinstance(nt[0], dict) else {}
    return {"id": slot.get("id"), "processing": bool(slot.get("is_processing")), "n_ctx": slot.get("n_ctx"),
            "task": slot.get("id_task"), "decoded": nt.get("n_decoded")}


def totals(registry) -> dict[str, Any]:
    """The gateway's counters as the page shows them: sums of /metrics series, nothing else."""
    out: dict[str, Any] = {"requests": {}, "prompt": {}, "output": 0, "kv_saves": {}, "kv_restores": {},
                           "background": {}, "synthetic": {}, "disconnects": {}}
    where = {"orchestrator_requests": ("requests", "status"), "orchestrator_prompt_tokens": ("prompt", "cache"),
             "orchestrator_kv_saves": ("kv_saves", "result"), "orchestrator_kv_restores": ("kv_restores", "result"),
             "orchestrator_background_answers": ("background", "result"),
             "orchestrator_synthetic_responses": ("synthetic", "kind"),
             "orchestrator_client_disconnects": ("disconnects", "stage")}
    for family in registry.collect():
        for s in family.samples:
            if not s.name.endswith("_total"):
                continue
            name = s.name[:-len("_total")]
            if name == "orchestrator_output_tokens":
                out["output"] += int(s.value)
            elif name in where:
                key, label = where[name]
                value = s.labels.get(label, "")
                out[key][value] = out[key].get(value, 0) + int(s.value)
    return out


async def state(request: web.Request) -> web.Response:
    dash: Dashboard = request.app[DASHBOARD]
    if not dash.logged_in(request):
        raise AuthenticationFailed("log in first: `orchestrator dashboard` prints a login link")
    gw = request.app[GATEWAY]
    snap = gw.inflight.snapshot()
    views = _backend_views(gw)
    slots = await asyncio.gather(*(dash.slots_of(b) for b, _ in views))
    backends = [{**view, "llama_slots": [_slot_view(s) for s in raw] if raw is not None else None}
                for (_, view), raw in zip(views, slots)]
    return web.json_response({
        "version": __version__, "uptime": round(time.time() - gw.started, 1), "csrf": dash.csrf(request),
        "backends": backends, **snap,
        "history": dash.history.snapshot(), "totals": totals(gw.metrics.registry),
    }, headers=SECURITY_HEADERS)


async def cancel(request: web.Request) -> web.Response:
    dash: Dashboard = request.app[DASHBOARD]
    if not dash.logged_in(request):
        raise AuthenticationFailed("log in first: `orchestrator dashboard` prints a login link")
    given = request.headers.get(CSRF_HEADER, "")
    if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), dash.csrf(request).encode()):
        raise Forbidden(f"cancel needs the page's {CSRF_HEADER} token")
    try:
        entry_id = int(request.match_info["id"])
    except ValueError:
        raise NotFound("no such request") from None
    if not request.app[GATEWAY].inflight.cancel(entry_id):
        raise NotFound(f"request {entry_id} is not in flight (finished already?)")
    return web.json_response({"cancelled": entry_id}, headers=SECURITY_HEADERS)


async def login(request: web.Request) -> web.Response:
    dash: Dashboard = request.app[DASHBOARD]
    if not dash.take_ticket(request.query.get("t", "")):
        raise AuthenticationFailed("this login link is expired or was used already; "
                                   "`orchestrator dashboard` prints a new one")
    # Returned, not raised: the app renders raised HTTP exceptions as Anthropic errors.
    resp = web.Response(status=303, headers={**SECURITY_HEADERS, "Location": PREFIX})
    # The ticket leaves the address bar with the redirect; Referrer-Policy keeps it out of any Referer.
    resp.set_cookie(COOKIE, dash.session_cookie(), max_age=SESSION_SECONDS, path=PREFIX, httponly=True,
                    samesite="Strict", secure=request.secure)
    return resp


async def page(request: web.Request) -> web.Response:
    return web.Response(body=(WEB / "index.html").read_bytes(), content_type="text/html",
                        charset="utf-8", headers=SECURITY_HEADERS)


async def asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in STATIC:
        raise NotFound(f"{PREFIX}/static/{name}: no such file")
    headers = {**SECURITY_HEADERS, "Cache-Control": "no-cache"}
    return web.Response(body=(WEB / name).read_bytes(), content_type=STATIC[name], headers=headers)


def _response_begun(request: web.Request) -> bool:
    # aiohttp says so only in its writer's private fields (headers sent, or queued to go with the body).
    w = request.writer
    return bool(getattr(w, "_headers_written", False) or getattr(w, "_headers_buf", None) is not None)


@web.middleware
async def track(request: web.Request, handler) -> web.StreamResponse:
    """Each `/v1/messages` request in the tracker of what runs (inflight.py) while it runs, then in the
    recent list and the history. Its identity (Claude Code's headers) is read here, once, and travels
    in its entry (`request[ENTRY]`, the handler's Exchange). A Cancel from the page arrives here as this
    task's cancellation: once the request path has counted it as a vanished client's, the (still
    connected) client gets an error, or, mid-stream, the connection is closed."""
    if request.path != "/v1/messages" or request.method != "POST":
        return await handler(request)
    dash: Dashboard = request.app[DASHBOARD]
    tracker = request.app[GATEWAY].inflight
    task = asyncio.current_task()
    entry = request[ENTRY] = tracker.begin(identity.from_headers(request.headers), task)
    status = "client_gone"
    try:
        response = await handler(request)
        status = str(response.status)
        return response
    except GatewayError as e:
        status = str(e.status)
        raise
    except asyncio.CancelledError:
        if not entry.cancelled or task is None or task.uncancel() > 0:
            raise
        status = "cancelled"
        if _response_begun(request):
            # Headers (and perhaps events) went out: a second response cannot follow; close instead.
            if request.transport is not None:
                request.transport.close()
            raise
        raise error_for_status(409, "request cancelled from the gateway's dashboard") from None
    finally:
        tracker.end(entry, status)
        dash.history.add(entry.view(time.monotonic()))


def add_dashboard(app: web.Application, key: str | None) -> None:
    app[DASHBOARD] = Dashboard(key)
    r = app.router
    r.add_get(PREFIX, page)
    r.add_get(PREFIX + "/", page)
    r.add_get(PREFIX + "/login", login)
    r.add_get(PREFIX + "/api/state", state)
    r.add_post(PREFIX + "/api/cancel/{id}", cancel)
    r.add_get(PREFIX + "/static/{name}", asset)
