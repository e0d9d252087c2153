"""The one configuration: frozen dataclasses loaded from one TOML file.

Validation happens in one pass and reports every problem at once, each naming
its key (`backends[1].slots: ...`), so a person fixes the file in one edit.
Unknown keys are errors: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

SYNTHETIC = "synthetic"


class ConfigError(ValueError):
    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


@dataclass(frozen=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 9090
    # Claude Code's main requests are 30-90 KB; a long session with pasted
    # files can reach a few MB. Far beyond that is a mistake, not a prompt.
    max_body_bytes: int = 32 * 1024 * 1024
    # count_tokens is answered by the backend only if it answers quickly;
    # /context fires up to 25 of them and waits for all.
    count_tokens_timeout_seconds: float = 2.0
    # How long to wait for a backend's TCP connect before calling it down.
    connect_timeout_seconds: float = 5.0
    health_interval_seconds: float = 2.0
    # A streaming request silent this long (queued, backend restarting, long
    # prefill) gets its headers and an SSE ping, then a ping every interval; 0: never.
    ping_interval_seconds: float = 10.0
    # Access. On any address but loopback the gateway needs a key (or `open`);
    # ORCHESTRATOR_API_KEY in the environment sets it too. Never logged.
    api_key: str | None = field(default=None, repr=False)
    # Serve without a key on a non-loopback address; said in the log and /health.
    open: bool = False
    # Browser protection: web origins allowed besides the gateway's own, and
    # Host names besides loopback names, the bind address and this machine's names.
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    # Slow and greedy clients: a request's headers must arrive within
    # header_timeout of the connection (or of the previous answer on it), its body within
    # body_timeout; at most max_connections at once (past it: 503 and close).
    header_timeout_seconds: float = 30.0
    body_timeout_seconds: float = 120.0
    max_connections: int = 512
    # A backend's client vanished: its slot is free again only when the
    # backend's /slots shows it idle; this long at most, then the backend counts as down.
    release_timeout_seconds: float = 30.0

    @property
    def url(self) -> str:
        """Where a program on this machine reaches the gateway."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "*", "") else "::1" if self.host == "::" else self.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"


@dataclass(frozen=True)
class QueueConfig:
    max_depth: int = 64
    # Claude Code's own timeout is 600 s per attempt (X-Stainless-Timeout).
    max_wait_seconds: float = 600.0
    retry_after_seconds: int = 10
    # How long requests wait for a backend that is down (crashed, restarting)
    # before they get 529. Claude Code retries a main call for about 3 minutes.
    down_grace_seconds: float = 300.0


@dataclass(frozen=True)
class BackendConfig:
    name: str
    url: str
    slots: int = 1
    models: tuple[str, ...] = ("*",)
    role: str = "main"  # "main" or "background"
    # Sent to the backend as x-api-key and Bearer token (remote backends).
    api_key: str | None = None
    # The client's own key is not forwarded unless asked: Claude Code sends a
    # real Anthropic key when a person has one configured.
    forward_client_key: bool = False
    health_path: str = "/health"
    # The process supervisord runs for this backend; None for a remote or
    # self-managed one. Placeholders: {llama_server}, {default_model}, {host}, {port}.
    command: str | None = None
    # supervisord: seconds the process must stay up to count as started, and
    # start attempts before it is FATAL.
    start_seconds: int = 5
    start_retries: int = 3
    # Clamp the request's max_tokens to this (0: no clamp). Claude Code asks for
    # 32000; a small local model that never stops would fill its whole context.
    max_output_tokens: int = 0


@dataclass(frozen=True)
class RoutingConfig:
    background_models: tuple[str, ...] = ("*haiku*",)
    # A backend name with role "background", or "synthetic".
    background: str = SYNTHETIC
    # Non-streaming max_tokens=1 requests are token-count probes from Claude
    # Code releases that lack count_tokens: "count_tokens" answers them from
    # the count path, "forward" sends them to the model like any request.
    count_probes: str = "count_tokens"
    # Drop the per-request `x-anthropic-billing-header` system block, which
    # changes every request and so defeats the backend's prompt cache.
    strip_billing_header: bool = True


@dataclass(frozen=True)
class SupervisorConfig:
    # Where `orchestrator up` keeps supervisord.conf and var/ (logs, socket,
    # Prometheus data); relative paths are relative to the config file.
    dir: str = "."
    # The llama-server binary for {llama_server}; empty: PATH, then the cached build.
    llama_server: str = ""
    # Set for the gateway by `orchestrator up`: supervisord's socket, to see
    # restarts and FATAL backends, and the folder of the programs' logs.
    socket: str = ""
    log_dir: str = ""
    # Set by `orchestrator up`: a file holding the secret the event listener
    # proves itself with on /internal/process-event (kept out of supervisord.conf).
    events_secret_file: str = ""
    # Where the bundled Prometheus listens; empty: do not run one.
    prometheus_listen: str = "127.0.0.1:9091"
    prometheus_scrape_interval: str = "5s"


@dataclass(frozen=True)
class ClaudeConfig:
    """What `orchestrator claude` and `orchestrator env` tell Claude Code."""

    # The names Claude Code sends: `model` routes as main traffic, `small_model`
    # must match routing.background_models so background calls are known by name.
    model: str = "local-model"
    small_model: str = "local-haiku"
    # A first turn on a big model (25k tokens of prefill) takes minutes.
    api_timeout_ms: int = 3_600_000


@dataclass(frozen=True)
class Config:
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    claude: ClaudeConfig = field(default_factory=ClaudeConfig)
    backends: tuple[BackendConfig, ...] = (BackendConfig(name="primary", url="http://127.0.0.1:8080"),)

    def backend(self, name: str) -> BackendConfig:
        for b in self.backends:
            if b.name == name:
                return b
        raise KeyError(name)

    @property
    def main_backends(self) -> tuple[BackendConfig, ...]:
        return tuple(b for b in self.backends if b.role == "main")

    @property
    def background_backend(self) -> BackendConfig | None:
        if self.routing.background == SYNTHETIC:
            return None
        return self.backend(self.routing.background)


class _Checker:
    """Collects problems while reading a table; never stops at the first."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def table(self, raw: Any, key: str, allowed: set[str]) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.problems.append(f"{key}: must be a table")
            return {}
        for k in sorted(set(raw) - allowed):
            self.problems.append(f"{key}.{k}: unknown key (known: {', '.join(sorted(allowed))})")
        return raw

    def get(self, raw: dict[str, Any], key: str, path: str, kind: type | tuple[type, ...],
            default: Any, *, check=None, why: str = "") -> Any:
        if key not in raw:
            return default
        value = raw[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python; a port of `true` is still a mistake.
        if isinstance(value, bool) and bool not in kinds:
            ok = False
        else:
            ok = isinstance(value, kinds)
        if ok and check is not None and not check(value):
            ok = False
        if not ok:
            names = " or ".join(k.__name__ for k in kinds)
            self.problems.append(f"{path}.{key}: must be {why or names}, got {value!r}")
            return default
        if float in kinds and isinstance(value, int):
            value = float(value)
        return value

    def patterns(self, raw: dict[str, Any], key: str, path: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.get(raw, key, path, list, list(default),
                         check=lambda v: all(isinstance(p, str) and p for p in v),
                         why="a list of non-empty strings")
        return tuple(value)


def _positive(v: float) -> bool:
    return v > 0


def _url_ok(v: str) -> bool:
    parts = urlsplit(v)
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def same_server_key(url: str) -> str:
    """The server a URL reaches: scheme, host and port, whatever the spelling."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if is_loopback_host(host):
        host = "loopback"
    return f"{parts.scheme}://{host}:{parts.port or (443 if parts.scheme == 'https' else 80)}"


def is_loopback_host(host: str) -> bool:
    """localhost or a loopback address; not a name that merely starts with "127." (127.0.0.1.nip.io)."""
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_problem(gateway: GatewayConfig) -> str | None:
    """A gateway others can reach must check a key, unless told plainly that it runs open."""
    if is_loopback_host(gateway.host) or gateway.api_key or gateway.open:
        return None
    return (f"gateway.host: {gateway.host!r} is reachable from other machines; set gateway.api_key (or "
            f"ORCHESTRATOR_API_KEY, or --api-key) so only you get in, or gateway.open = true (--open) to serve "
            f"anyone who can reach it")


def config_from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    c = _Checker()
    top = c.table(raw, source, {"gateway", "queue", "routing", "backends", "supervisor", "claude"})
    base = Config()

    g = c.table(top.get("gateway"), "gateway", set(GatewayConfig.__dataclass_fields__))
    gw = base.gateway
    gateway = GatewayConfig(
        host=c.get(g, "host", "gateway", str, gw.host, check=bool, why="a host name"),
        port=c.get(g, "port", "gateway", int, gw.port, check=lambda v: 0 <= v < 65536, why="a port (0-65535)"),
        max_body_bytes=c.get(g, "max_body_bytes", "gateway", int, gw.max_body_bytes, check=_positive,
                             why="a positive integer"),
        count_tokens_timeout_seconds=c.get(g, "count_tokens_timeout_seconds", "gateway", (int, float),
                                           gw.count_tokens_timeout_seconds, check=_positive, why="a positive number"),
        connect_timeout_seconds=c.get(g, "connect_timeout_seconds", "gateway", (int, float),
                                      gw.connect_timeout_seconds, check=_positive, why="a positive number"),
        health_interval_seconds=c.get(g, "health_interval_seconds", "gateway", (int, float),
                                      gw.health_interval_seconds, check=_positive, why="a positive number"),
        ping_interval_seconds=c.get(g, "ping_interval_seconds", "gateway", (int, float), gw.ping_interval_seconds,
                                    check=lambda v: v >= 0, why="a non-negative number"),
        api_key=c.get(g, "api_key", "gateway", str, gw.api_key, check=lambda v: len(v) >= 8,
                      why="a key of at least 8 characters"),
        open=c.get(g, "open", "gateway", bool, gw.open),
        allowed_origins=c.patterns(g, "allowed_origins", "gateway", gw.allowed_origins),
        allowed_hosts=c.patterns(g, "allowed_hosts", "gateway", gw.allowed_hosts),
        header_timeout_seconds=c.get(g, "header_timeout_seconds", "gateway", (int, float),
                                     gw.header_timeout_seconds, check=_positive, why="a positive number"),
        body_timeout_seconds=c.get(g, "body_timeout_seconds", "gateway", (int, float), gw.body_timeout_seconds,
                                   check=_positive, why="a positive number"),
        max_connections=c.get(g, "max_connections", "gateway", int, gw.max_connections, check=_positive,
                              why="a positive integer"),
        release_timeout_seconds=c.get(g, "release_timeout_seconds", "gateway", (int, float),
                                      gw.release_timeout_seconds, check=_positive, why="a positive number"),
    )

    q = c.table(top.get("queue"), "queue", set(QueueConfig.__dataclass_fields__))
    qd = base.queue
    queue = QueueConfig(
        max_depth=c.get(q, "max_depth", "queue", int, qd.max_depth, check=lambda v: v >= 0,
                        why="a non-negative integer"),
        max_wait_seconds=c.get(q, "max_wait_seconds", "queue", (int, float), qd.max_wait_seconds,
                               check=_positive, why="a positive number"),
        retry_after_seconds=c.get(q, "retry_after_seconds", "queue", int, qd.retry_after_seconds,
                                  check=_positive, why="a positive integer"),
        down_grace_seconds=c.get(q, "down_grace_seconds", "queue", (int, float), qd.down_grace_seconds,
                                 check=_positive, why="a positive number"),
    )

    sv = c.table(top.get("supervisor"), "supervisor", set(SupervisorConfig.__dataclass_fields__))
    supervisor = SupervisorConfig(**{k: c.get(sv, k, "supervisor", str, getattr(base.supervisor, k))
                                     for k in SupervisorConfig.__dataclass_fields__})

    backends: list[BackendConfig] = []
    raw_backends = top.get("backends")
    if raw_backends is None:
        backends = list(base.backends)
    elif not isinstance(raw_backends, list) or not raw_backends:
        c.problems.append("backends: must be a non-empty array of tables ([[backends]])")
    else:
        for i, rb in enumerate(raw_backends):
            path = f"backends[{i}]"
            b = c.table(rb, path, set(BackendConfig.__dataclass_fields__))
            name = c.get(b, "name", path, str, "", check=lambda v: v and v != SYNTHETIC,
                         why='a non-empty name other than "synthetic"')
            if "name" not in b:
                c.problems.append(f"{path}.name: required")
            url = c.get(b, "url", path, str, "", check=_url_ok, why="an http(s) URL")
            if "url" not in b:
                c.problems.append(f"{path}.url: required")
            backends.append(BackendConfig(
                name=name or f"backend{i}",
                url=url.rstrip("/"),
                slots=c.get(b, "slots", path, int, 1, check=lambda v: v >= 1, why="a positive integer"),
                models=c.patterns(b, "models", path, ("*",)),
                role=c.get(b, "role", path, str, "main", check=lambda v: v in ("main", "background"),
                           why='"main" or "background"'),
                api_key=c.get(b, "api_key", path, str, None),
                forward_client_key=c.get(b, "forward_client_key", path, bool, False),
                health_path=c.get(b, "health_path", path, str, "/health", check=lambda v: v.startswith("/"),
                                  why='a path starting with "/"'),
                command=c.get(b, "command", path, str, None, check=lambda v: bool(v.strip()),
                              why="a non-empty command line"),
                start_seconds=c.get(b, "start_seconds", path, int, 5, check=lambda v: v >= 0,
                                    why="a non-negative integer"),
                start_retries=c.get(b, "start_retries", path, int, 3, check=lambda v: v >= 0,
                                    why="a non-negative integer"),
                max_output_tokens=c.get(b, "max_output_tokens", path, int, 0, check=lambda v: v >= 0,
                                        why="a non-negative integer"),
            ))
        names = [b.name for b in backends]
        for dup in sorted({n for n in names if names.count(n) > 1}):
            c.problems.append(f"backends: name {dup!r} is used more than once")
        # Two backends on one server would each count its slots: two generations at once.
        by_url: dict[str, list[str]] = {}
        for b in backends:
            if b.url:
                by_url.setdefault(same_server_key(b.url), []).append(b.name)
        for key, on_it in sorted(by_url.items()):
            if len(on_it) > 1:
                c.problems.append(f"backends: {', '.join(repr(n) for n in on_it)} have the same URL ({key}); "
                                  f"one server is one backend (give it more slots instead)")
        if not any(b.role == "main" for b in backends):
            c.problems.append('backends: at least one backend needs role = "main"')

    r = c.table(top.get("routing"), "routing", set(RoutingConfig.__dataclass_fields__))
    rd = base.routing
    routing = RoutingConfig(
        background_models=c.patterns(r, "background_models", "routing", rd.background_models),
        background=c.get(r, "background", "routing", str, rd.background),
        count_probes=c.get(r, "count_probes", "routing", str, rd.count_probes,
                           check=lambda v: v in ("count_tokens", "forward"), why='"count_tokens" or "forward"'),
        strip_billing_header=c.get(r, "strip_billing_header", "routing", bool, rd.strip_billing_header),
    )
    if routing.background != SYNTHETIC:
        match = [b for b in backends if b.name == routing.background]
        if not match:
            c.problems.append(f"routing.background: {routing.background!r} names no backend "
                              f'(use "synthetic" or a backend name)')
        elif match[0].role != "background":
            c.problems.append(f'routing.background: backend {routing.background!r} must have role = "background"')

    cl = c.table(top.get("claude"), "claude", set(ClaudeConfig.__dataclass_fields__))
    cd = base.claude
    claude = ClaudeConfig(
        model=c.get(cl, "model", "claude", str, cd.model, check=bool, why="a model name"),
        small_model=c.get(cl, "small_model", "claude", str, cd.small_model, check=bool, why="a model name"),
        api_timeout_ms=c.get(cl, "api_timeout_ms", "claude", int, cd.api_timeout_ms, check=_positive,
                             why="a positive integer"),
    )
    if not any(fnmatch.fnmatchcase(claude.small_model.lower(), p.lower()) for p in routing.background_models):
        c.problems.append(f"claude.small_model: {claude.small_model!r} matches none of routing.background_models "
                          f"{list(routing.background_models)}, so Claude Code's background calls would take the "
                          f"main slot")

    if c.problems:
        raise ConfigError(c.problems, source)
    return Config(gateway=gateway, queue=queue, routing=routing, backends=tuple(backends), supervisor=supervisor,
                  claude=claude)


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError([f"file not found: {path}"], str(path)) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"not valid TOML: {e}"], str(path)) from None
    return config_from_dict(raw, str(path))


def with_overrides(config: Config, *, host: str | None = None, port: int | None = None,
                   supervisor_socket: str | None = None, log_dir: str | None = None,
                   api_key: str | None = None, open: bool | None = None,
                   events_secret_file: str | None = None) -> Config:
    """The config with command-line and environment values on top; checked again as a whole."""
    gateway = config.gateway
    if host is not None:
        gateway = replace(gateway, host=host)
    if port is not None:
        gateway = replace(gateway, port=port)
    if api_key:
        if len(api_key) < 8:
            raise ConfigError(["api key: must be at least 8 characters"], "command line")
        gateway = replace(gateway, api_key=api_key)
    if open is not None:
        gateway = replace(gateway, open=open)
    exposed = exposure_problem(gateway)
    if exposed:
        raise ConfigError([exposed], "command line")
    supervisor = config.supervisor
    if supervisor_socket is not None:
        supervisor = replace(supervisor, socket=supervisor_socket)
    if log_dir is not None:
        supervisor = replace(supervisor, log_dir=log_dir)
    if events_secret_file is not None:
        supervisor = replace(supervisor, events_secret_file=events_secret_file)
    return replace(config, gateway=gateway, supervisor=supervisor)
