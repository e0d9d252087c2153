"""The one configuration: frozen dataclasses loaded from one TOML file.

Every key is declared once, below, with its type, default, limits and a
one-line description (`setting`). From that declaration come: the reading and
validation of a file (every problem at once, each naming its key path, such
as `backends[1].slots: ...`; unknown keys are errors, so a typo never falls
back silently to a default), the environment overrides
(`ORCHESTRATOR_<TABLE>_<KEY>`), what `check-config` reports, and the
documented example file (`orchestrator example-config`, committed as
deploy/orchestrator.example.toml and checked against it by a test).
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from dataclasses import MISSING, dataclass, field
from typing import Any, Callable
from urllib.parse import SplitResult, urlsplit

SYNTHETIC = "synthetic"
ENV_PREFIX = "ORCHESTRATOR_"


class ConfigError(ValueError):
    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


@dataclass(frozen=True)
class Check:
    """What a key's value must be: `test` passes, else the problem says it must be `why`; `normalize`,
    if given, is applied to a value that passed (a URL's trailing "/")."""

    test: Callable[[Any], bool]
    why: str
    normalize: Callable[[Any], Any] | None = None


def setting(default: Any, doc: str, *, check: Check | None = None, example: Any = None, secret: bool = False,
            env: str | None = None) -> Any:
    """One configuration key: its default (MISSING: required), a one-line description, and its limits.

    `check`: what a value must be (Check). `example`: shown in the example file for a key without a
    useful default. `secret`: never in repr nor in check-config's report. `env`: an extra environment name.
    """
    meta = {"doc": doc, "check": check and check.test, "why": check.why if check else "", "example": example,
            "secret": secret, "env": env, "normalize": check and check.normalize}
    return field(default=default, repr=not secret, metadata=meta)


def _positive(v: float) -> bool:
    return v > 0


def _non_negative(v: float) -> bool:
    return v >= 0


def _ca_bundle_ok(path: str) -> bool:
    try:
        ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError, ValueError):
        return False
    return True


def _worker_ok(worker: Any) -> bool:
    host, sep, port = str(worker).rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def _url_ok(v: str) -> bool:
    parts = urlsplit(v)
    return parts.scheme in ("http", "https") and bool(parts.hostname)


@dataclass(frozen=True)
class GatewayConfig:
    host: str = setting("127.0.0.1", "address to listen on; any but loopback needs api_key (or open)",
                        check=Check(bool, "a host name"))
    port: int = setting(9090, "point ANTHROPIC_BASE_URL here",
                        check=Check(lambda v: 0 <= v < 65536, "a port (0-65535)"))
    # Claude Code's main requests are 30-90 KB; a long session with pasted files
    # reaches megabytes. Far beyond that is a mistake, not a prompt.
    max_body_bytes: int = setting(32 * 1024 * 1024, "largest request body (32 MiB); past it: 413",
                                  check=Check(_positive, "a positive integer"))
    # /context fires up to 25 count_tokens calls at once and waits for all.
    count_tokens_timeout_seconds: float = setting(2.0, "then count_tokens answers with a local estimate",
                                                  check=Check(_positive, "a positive number"))
    connect_timeout_seconds: float = setting(5.0, "a backend's TCP connect; past it the backend counts as down",
                                             check=Check(_positive, "a positive number"))
    health_interval_seconds: float = setting(2.0, "backend health polling (every 0.25 s while one is down)",
                                             check=Check(_positive, "a positive number"))
    ping_interval_seconds: float = setting(10.0, "SSE pings while a streaming request waits in silence; 0: never",
                                           check=Check(_non_negative, "a non-negative number"))
    api_key: str | None = setting(None, "clients must send it (x-api-key or Bearer); required off loopback",
                                  check=Check(lambda v: len(v) >= 8, "a key of at least 8 characters"),
                                  example="a-long-random-string", secret=True, env="ORCHESTRATOR_API_KEY")
    open: bool = setting(False, "serve without a key off loopback (said in the log and /health)")
    allowed_origins: tuple[str, ...] = setting((), "web origins allowed besides the gateway's own (browser protection)")
    allowed_hosts: tuple[str, ...] = setting((), "Host names allowed besides loopback, the bind address, this machine")
    header_timeout_seconds: float = setting(30.0, "request headers must arrive within this; past it: 408 and close",
                                            check=Check(_positive, "a positive number"))
    body_timeout_seconds: float = setting(120.0, "the request body within this; past it: 408",
                                          check=Check(_positive, "a positive number"))
    max_connections: int = setting(512, "open connections at once; past it: 503 and close",
                                   check=Check(_positive, "a positive integer"))
    write_timeout_seconds: float = setting(30.0, "a streaming client that takes none of its answer for this long "
                                                 "counts as gone (its slot is freed once the backend lets go)",
                                           check=Check(_positive, "a positive number"))
    release_timeout_seconds: float = setting(30.0, "a vanished client's request still on the backend: warn "
                                                   "(its slot stays busy until the backend lets go)",
                                             check=Check(_positive, "a positive number"))

    @property
    def url(self) -> str:
        """Where a program on this machine reaches the gateway."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "*", "") else "::1" if self.host == "::" else self.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"


@dataclass(frozen=True)
class QueueConfig:
    # Five Claude Code sessions starting at once, a /context each, put about 70 requests on one slot.
    max_depth: int = setting(256, "waiting requests per backend; past it: 529 overloaded_error",
                             check=Check(_non_negative, "a non-negative integer"))
    # A waiting request holds its body and its parsed form, about 3x its size (bench_overhead.py):
    # 512 MiB admits 70 waiting requests of 7 MB (a long session) for about 1.6 GB resident.
    max_bytes: int = setting(512 * 1024 * 1024, "request bodies waiting per backend, in bytes (512 MiB); past it: "
                             "529 overloaded_error (a request alone is never refused for its size)",
                             check=Check(_positive, "a positive integer"))
    # Claude Code's own timeout is 600 s per attempt (X-Stainless-Timeout).
    max_wait_seconds: float = setting(600.0, "longest wait for a slot; past it: 529 overloaded_error",
                                      check=Check(_positive, "a positive number"))
    retry_after_seconds: int = setting(10, "the retry-after header sent with a 529", check=Check(_positive,
                                       "a positive integer"))
    # A tool loop's next turn often finds another conversation's turn waiting; taking it first spares
    # a switch of the slot's cache (a park and an unpark: 50-75 ms a turn on SmolLM2, seconds for a
    # big model's gigabytes; a re-prefill without saves). Bounded so that nobody starves.
    cache_preference_max_passes: int = setting(3, "a waiter of the conversation a slot holds may go before an "
                                               "earlier waiter of its priority at most this many times; 0: off",
                                               check=Check(_non_negative, "a non-negative integer"))
    cache_preference_max_seconds: float = setting(60.0, "... and only while that earlier waiter has waited less "
                                                  "than this", check=Check(_non_negative, "a non-negative number"))
    # The next turn of a tool loop is sent once the last answer has ended and the tool has run: a
    # read takes milliseconds, Claude Code's own work between turns tens of them.
    cache_preference_keep_seconds: float = setting(0.5, "a one-slot backend's slot, released by an answer asking "
                                                   "for a tool while others wait, is kept for that conversation's next turn "
                                                   "at most this long (and no longer than a switch would cost: a "
                                                   "park and an unpark at the measured pace); 0: never",
                                                   check=Check(_non_negative, "a non-negative number"))
    # Claude Code retries a main call for about 3 minutes.
    down_grace_seconds: float = setting(300.0, "requests wait this long for a backend that is down, then 529",
                                        check=Check(_positive, "a positive number"))


@dataclass(frozen=True)
class BackendConfig:
    name: str = setting(MISSING, "the backend's name, in metrics, logs and routing.background",
                        check=Check(lambda v: bool(v) and v != SYNTHETIC, 'a non-empty name other than "synthetic"'),
                        example="primary")
    url: str = setting(MISSING, "the server's base URL",
                       check=Check(_url_ok, "an http(s) URL", normalize=lambda v: v.rstrip("/")),
                       example="http://127.0.0.1:8080")
    slots: int = setting(0, "requests it may run at once (llama-server: its --parallel); 0: as many as the "
                         "engine says it runs (vLLM's --max-num-seqs), else one (llama-server's slot 0 is "
                         "the one saved and parked)",
                         check=Check(lambda v: v >= 0, "a non-negative integer"))
    models: tuple[str, ...] = setting(("*",), "model-name patterns (fnmatch, case-insensitive) routed here",
                                      check=Check(lambda v: len(v) > 0, "a non-empty list of patterns"))
    work_capable: bool = setting(False, 'a role = "background" backend that can do agents\' work (tools, '
                                 "long tasks), for routing.background_work; a title model cannot")
    role: str = setting("main", '"main", or "background" for routing.background',
                        check=Check(lambda v: v in ("main", "background"), '"main" or "background"'))
    # The client's own key is never forwarded unless asked: Claude Code sends a
    # real Anthropic key when a person has one configured.
    api_key: str | None = setting(None, "sent to the backend as x-api-key and Bearer (remote backends)",
                                  example="sk-...", secret=True)
    forward_client_key: bool = setting(False, "send the client's own key to this backend")
    # An engine behind a router of its own keeps a conversation's cache only if the router keeps it on one
    # replica: the router reads a session from a header (llm-d's session affinity, an Envoy hash policy).
    session_header: str = setting("", "a header a router in front of this engine keeps sessions by: each request "
                                  "carries its conversation's key (hex; Claude Code's session and agent "
                                  "bound to the prompt's prefix) in it; empty: none",
                                  check=Check(lambda v: v == "" or re.fullmatch(r"[A-Za-z0-9-]{1,64}", v) is not None,
                                              "a header name (letters, digits, '-')"), example="x-session-id")
    health_path: str = setting("/health", 'polled for health; any answer but 503 counts as up (a 404: an API '
                               'without one); "" for a server with no health endpoint at all: its root is '
                               'polled, and any HTTP answer means up',
                               check=Check(lambda v: v == "" or v.startswith("/"), 'a path starting with "/", or ""'))
    # A remote backend: its own CA, and timers a local server must not have.
    ca_file: str = setting("", "a PEM bundle of the CA that signs this https backend's certificate; empty: the "
                           "system's", example="/etc/ssl/private-ca.pem",
                           check=Check(lambda v: not v or _ca_bundle_ok(v), "a readable PEM file of CA certificates"))
    connect_timeout_seconds: float = setting(0.0, "its TCP (and TLS) connect; 0: gateway.connect_timeout_seconds",
                                             check=Check(_non_negative, "a non-negative number of seconds"))
    read_timeout_seconds: float = setting(0.0, "the longest silence while its answer is read; past it the request "
                                          "fails (504 before its answer began, an SSE error after; never sent "
                                          "again: the backend may still be working on it). 0: none (a big "
                                          "model's first prefill is silent for minutes)", check=Check(_non_negative,
                                          "a non-negative number of seconds"))
    command: str | None = setting(None, "the process supervisord runs; placeholders {llama_server} "
                                        "{default_model} {host} {port}",
                                  check=Check(lambda v: bool(v.strip()), "a non-empty command line"),
                                  example="{llama_server} --model /models/m.gguf --host {host} --port {port} "
                                          "--parallel 1 --metrics")
    # A model too big for one machine: llama.cpp splits it across RPC workers (engines/rpc_workers.py).
    rpc_workers: tuple[str, ...] = setting((), 'llama.cpp RPC workers ("HOST:PORT") its llama-server splits the '
                                           "model across (--rpc, added to `command`); on this machine and "
                                           "supervised, each runs as the program rpc-NAME-N, and the head is "
                                           "restarted when one comes back (a head never reconnects)",
                                           check=Check(lambda v: all(_worker_ok(w) for w in v),
                                                       'a list of "HOST:PORT"'), example=["127.0.0.1:50052"])
    start_seconds: int = setting(5, "supervisord: seconds it must stay up to count as started",
                                 check=Check(_non_negative, "a non-negative integer"))
    start_retries: int = setting(3, "supervisord: start attempts before it is FATAL", check=Check(_non_negative,
                                 "a non-negative integer"))
    # Claude Code 2.1.332 sends a role "system" message inside messages; Qwen3.5's template (and
    # others) refuse a system message after the first, and llama-server answers 500 to every turn.
    system_messages: str = setting("auto", '"fold": a system message inside messages is appended to the user '
                                   'message before it; "forward": sent as is; "auto": fold for a backend on '
                                   'this machine (its chat template renders it), forward to a remote API',
                                   check=Check(lambda v: v in ("auto", "fold", "forward"),
                                               '"auto", "fold" or "forward"'))
    # Claude Code asks for 32000; a small model that never stops would fill its context.
    max_output_tokens: int = setting(0, "clamp the request's max_tokens to this; 0: no clamp",
                                     check=Check(_non_negative, "a non-negative integer"))
    # A crash or `make down` otherwise costs a re-prefill of the whole conversation (minutes on a big model).
    kv_save: bool = setting(True, "save the slot's KV cache when idle, restore it after a restart (supervised, "
                                  "or with kv_save_dir)")
    kv_save_dir: str = setting("", "the folder this server saves slots in (its --slot-save-path); empty: "
                                   "var/slots/NAME when supervised, else no saving")
    # A save of 100k tokens of a big model is gigabytes; each conversation keeps its newest save.
    kv_save_max_bytes: int = setting(16 * 1024 ** 3, "saves kept on disk for this backend (16 GiB); the least "
                                                     "recently used dropped past it",
                                     check=Check(_positive, "a positive integer"))
    # 16 GiB holds 11,000-35,000 small saves; the folder's index is in memory (kv/folder.py).
    kv_save_max_files: int = setting(2000, "saves kept for this backend, whatever their size; the least "
                                           "recently used dropped past it",
                                     check=Check(_positive, "a positive integer"))
    # A save that fills the disk fails, and so does everything else writing there.
    kv_save_min_free_bytes: int = setting(-1, "free space a save leaves on its disk, older saves dropped to keep "
                                              "it; -1: the smaller of 5% of the disk and 2 GiB",
                                          check=Check(lambda v: v >= -1, "-1 or a non-negative integer"))
    # Claude Code's tool loop sends the next turn within a tool's run time; a save waits for a pause.
    kv_save_idle_seconds: float = setting(2.0, "the slot idle this long, nobody waiting: then save",
                                          check=Check(_non_negative, "a non-negative number"))
    # Measured on SmolLM2-135M, 2 cores, --cache-ram 0 (issue 19): a prefill costs 5.6-7.1 s per 1k
    # tokens, a save 15-100 ms per 1k and a restore 6-11 ms per 1k (each with a fixed ~5 ms), so a
    # save and a restore cost under 2% of the prefill they spare; below ~10 tokens the fixed part wins.
    # llama.cpp keeps only the window's positions in a sliding-window model's layers (Gemma 3, gpt-oss):
    # a saved slot restores without them and the next turn is computed whole (issue 26).
    kv_swa_full: bool = setting(True, "a supervised sliding-window model (Gemma 2/3, gpt-oss, ...) that saves "
                                "its slot runs with --swa-full, so a restore brings the cache back; it costs "
                                "the window's layers' KV for the whole context (check-config gives the "
                                "figure). false: no --swa-full, and no saves that cannot pay off")
    # Gemma 3 27B at a 128k context: 51 GiB more; a server that cannot allocate it never starts.
    kv_swa_full_max_mib: int = setting(8192, "the most KV memory --swa-full may add (MiB, computed from the "
                                       "GGUF and the command) for the gateway to add it; over it, no "
                                       "--swa-full and no saves, and check-config says what it would cost",
                                       check=Check(_non_negative, "a non-negative integer"))
    kv_park: bool = setting(True, "one-slot server: save the slot's conversation before another one takes "
                                  "the slot (park), restore a conversation's save before its turn (unpark)")
    kv_park_min_tokens: int = setting(64, "park, unpark or checkpoint only a conversation of at least this many "
                                          "tokens (measured break-even: ~10 on SmolLM2)",
                                      check=Check(_non_negative, "a non-negative integer"))
    kv_checkpoint_share: float = setting(0.05, "the most of a busy conversation a crash may lose: it is saved before "
                                               "its next turn when the tokens not on disk pass this share of it, "
                                               "and earlier when computing them again would cost more than the "
                                               "save (both paces measured on the backend); 0: every turn",
                                         check=Check(_non_negative, "a non-negative number"))
    kv_park_max_seconds: float = setting(10.0, "a park or checkpoint expected (from the last save's pace) to hold "
                                               "a waiting request longer than this is skipped",
                                         check=Check(_non_negative, "a non-negative number"))


@dataclass(frozen=True)
class RoutingConfig:
    background_models: tuple[str, ...] = setting(("*haiku*",), "model names Claude Code uses for background "
                                                 "calls; only the housekeeping shapes among them are answered "
                                                 "by the gateway or the background backend, the rest is work")
    # Claude Code's agents (Explore, model: "haiku") run on the Haiku name: real work, with tools.
    background_work: bool = setting(False, "send work carried under a background model name (Claude Code's "
                                    "agents on the Haiku name) to routing.background, if that backend is "
                                    "declared work_capable; otherwise it goes to the main backends")
    background: str = setting(SYNTHETIC, '"synthetic", or the name of a role = "background" backend')
    count_probes: str = setting("count_tokens", 'max_tokens=1 probes: answered from "count_tokens", or "forward"',
                                check=Check(lambda v: v in ("count_tokens", "forward"), '"count_tokens" or "forward"'))
    strip_billing_header: bool = setting(True, "drop the per-request billing line that defeats the prompt cache")
    # A title or topic answer is small; a background model that takes longer (busy, slow, stuck) is
    # not worth waiting for when the gateway can answer at once.
    background_timeout_seconds: float = setting(
        20.0, "a title or topic answer from the background backend, its queue wait included; "
        "after it, the synthetic answer", check=Check(_positive, "a positive number of seconds"))
    # Several backends for one model form a pool. "Least busy" would send a conversation's next
    # turn to a server whose cache never saw its prefix: a cold prefill of minutes on a big model.
    affinity: bool = setting(True, "in a pool, send each conversation back to the backend that served it "
                             "last (its prompt cache), unless that one is down or too busy")
    affinity_max_wait_seconds: float = setting(
        120.0, "a conversation moves to another backend of its pool when its own one's expected wait is "
        "longer than this (roughly: what a cold prefill of it costs elsewhere)", check=Check(_positive,
        "a positive number of seconds"))
    affinity_max_conversations: int = setting(10_000, "conversations remembered (least recently used "
                                              "forgotten first)", check=Check(_positive, "a positive integer"))
    background_format: str = setting(
        "json_schema", 'how title and topic requests ask the background backend for JSON: "json_schema" '
        "(llama-server's /v1/chat/completions, the schema enforced as a grammar) or \"messages\" (sent to "
        "/v1/messages as they are); either way the answer is checked against the schema",
        check=Check(lambda v: v in ("json_schema", "messages"), '"json_schema" or "messages"'))


@dataclass(frozen=True)
class SupervisorConfig:
    dir: str = setting(".", "supervisord.conf and var/ go here (relative to this file)")
    llama_server: str = setting("", "the binary for {llama_server}; empty: PATH, then the cached build")
    socket: str = setting("", "set by `orchestrator up`: supervisord's socket, for restarts and FATAL")
    log_dir: str = setting("", "set by `orchestrator up`: where the programs' logs are")
    events_secret_file: str = setting("", "set by `orchestrator up`: the event listener's secret")
    prometheus_listen: str = setting("127.0.0.1:9091", "the bundled Prometheus; empty: do not run one")
    prometheus_scrape_interval: str = setting("5s", "how often Prometheus scrapes")


@dataclass(frozen=True)
class ClaudeConfig:
    """What `orchestrator claude` and `orchestrator env` tell Claude Code."""

    model: str = setting("local-model", "the name Claude Code sends for main requests", check=Check(bool,
                         "a model name"))
    small_model: str = setting("local-haiku", "its background model name; must match routing.background_models",
                               check=Check(bool, "a model name"))
    # A first turn on a big model (25k tokens of prefill) takes minutes.
    api_timeout_ms: int = setting(3_600_000, "Claude Code's API_TIMEOUT_MS", check=Check(_positive,
                                  "a positive integer"))


TABLES: dict[str, type] = {"gateway": GatewayConfig, "queue": QueueConfig, "routing": RoutingConfig,
                           "supervisor": SupervisorConfig, "claude": ClaudeConfig}


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


# ---- addresses ---------------------------------------------------------------------------------

def same_server_key(url: str) -> str:
    """The server a URL reaches: scheme, host and port, whatever the spelling."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if is_loopback_host(host) or host in ("0.0.0.0", "::"):  # all reach this machine's own server
        host = "loopback"
    return f"{parts.scheme}://{host}:{url_port(parts)}"


def url_port(parts: SplitResult) -> int:
    """The port a split URL reaches, its scheme's default when it names none."""
    return parts.port or (443 if parts.scheme == "https" else 80)


def is_loopback_host(host: str) -> bool:
    """localhost or a loopback address; not a name that merely starts with "127." (127.0.0.1.nip.io)."""
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
