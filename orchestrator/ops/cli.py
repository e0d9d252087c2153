"""The `orchestrator` command: a thin click layer over the library."""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import sys
import webbrowser
from pathlib import Path

import click

from .. import __version__
from ..config import SYNTHETIC, Config, ConfigError
from ..configfile import (
    config_from_dict,
    describe,
    load_config,
    render_example,
    with_overrides,
)
from ..engines.llama_server import adds_swa_full, saves_slots, slot_dir
from ..engines.model_cache import command_model, of_file
from ..engines.rpc_workers import find_rpc_server
from ..http import page
from ..kv.folder import folder_line
from . import claude_env, grafana, supervise
from . import status as status_view  # `status` is the command

# The gateway's key from the environment, for every command (serve, env, claude, status).
API_KEY_ENV = "ORCHESTRATOR_API_KEY"


def _one_liner_config(primary_url: str, slots: int, background: str) -> Config:
    raw: dict = {"backends": [{"name": "primary", "url": primary_url, "slots": slots}]}
    if background != SYNTHETIC:
        raw["backends"].append({"name": "background", "url": background, "role": "background"})
        raw["routing"] = {"background": "background"}
    return config_from_dict(raw, "command line")


@click.group()
@click.version_option(__version__, prog_name="orchestrator")
def main() -> None:
    """Run Claude Code against a local llama-server without flooding or crashing it."""


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config file.")
@click.option("--host", default=None, help="Address to listen on [default: 127.0.0.1].")
@click.option("--port", type=int, default=None, help="Port to listen on [default: 9090].")
@click.option("--primary-url", default="http://127.0.0.1:8080", show_default=True,
              help="The main llama-server (without --config).")
@click.option("--slots", type=click.IntRange(min=1), default=1, show_default=True,
              help="Requests the primary may run at once (its --parallel).")
@click.option("--background", default=SYNTHETIC, show_default=True,
              help='"synthetic", or the URL of a small-model server for background requests.')
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--api-key", envvar=API_KEY_ENV, default=None, show_envvar=True,
              help="Clients must send this key (x-api-key or Authorization: Bearer); needed off loopback.")
@click.option("--open", "run_open", is_flag=True, default=None,
              help="Serve without a key on a non-loopback address (anyone who reaches it uses your model).")
@click.option("--supervisor-socket", default=None, hidden=True, help="Set by `orchestrator up`.")
@click.option("--log-dir", default=None, hidden=True, help="Set by `orchestrator up`.")
@click.option("--events-secret-file", default=None, hidden=True, help="Set by `orchestrator up`.")
def serve(config_path, host, port, primary_url, slots, background, log_level, api_key, run_open,
          supervisor_socket, log_dir, events_secret_file) -> None:
    """Run the gateway."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = (load_config(config_path, os.environ) if config_path
                  else _one_liner_config(primary_url, slots, background))
        config = with_overrides(config, {"host": host, "port": port, "api_key": api_key, "open": run_open},
                                {"socket": supervisor_socket, "log_dir": log_dir,
                                 "events_secret_file": events_secret_file})
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    from ..http.app import serve as run

    run(config)


@main.command("check-config")
@click.argument("path", type=click.Path(dir_okay=False))
def check_config(path) -> None:
    """Validate a config file (with ORCHESTRATOR_* from the environment) and print what differs from the defaults."""
    try:
        config = with_overrides(load_config(path, os.environ))
    except ConfigError as e:
        raise click.ClickException("\n  ".join(["invalid config:", *e.problems])) from None
    click.echo(f"{path}: ok")
    for line in describe(config):
        click.echo(f"  {line}")
    for b in config.backends:  # the model's cache kind, where its command names the file
        model = command_model(b.command)
        if model and "{" not in model:  # a placeholder ({default_model}) is resolved by `up`
            cache = of_file(model, b.command, add_swa_full=adds_swa_full(b))
            click.echo(f"  backend {b.name} model cache: {cache.line()}")
        if saves_slots(b):  # where its saves go under `up`, and whether its budget fits that disk
            folder = slot_dir(_paths(config, Path(path).resolve()).var, b)
            click.echo(f"  backend {b.name} saves: {folder_line(folder, b.kv_save_max_bytes, b.kv_save_min_free_bytes)}")


@main.command("example-config")
def example_config() -> None:
    """Print the documented example configuration (every key, its default, what it does)."""
    click.echo(render_example(), nl=False)


def _load(config_path: str) -> tuple[Config, Path]:
    path = Path(config_path).resolve()
    try:
        return with_overrides(load_config(path, os.environ)), path
    except ConfigError as e:
        raise click.ClickException("\n  ".join(["invalid config:", *e.problems])) from None


def _paths(config: Config, config_path: Path) -> supervise.StackPaths:
    return supervise.StackPaths((config_path.parent / config.supervisor.dir).resolve())


REPO = Path(__file__).resolve().parents[2]


def _default_config() -> str:
    """Your ./orchestrator.toml, else the repository's, else the embedded default stack's."""
    for candidate in (Path("orchestrator.toml"), REPO / "orchestrator.toml", REPO / "deploy" / "orchestrator.toml"):
        if candidate.exists():
            return str(candidate)
    return "orchestrator.toml"


config_option = click.option("--config", "config_path", default=_default_config,
                             show_default="./orchestrator.toml, else deploy/orchestrator.toml",
                             type=click.Path(dir_okay=False, exists=True), help="TOML config file.")


@main.command()
@config_option
@click.option("--llama-server", "llama_server", default=None, help="llama-server binary for {llama_server}.")
@click.option("--timeout", default=180.0, show_default=True, help="Seconds to wait for every program.")
def up(config_path, llama_server, timeout) -> None:
    """Start the stack under supervisord (or update it); idempotent."""
    config, path = _load(config_path)
    paths = _paths(config, path)
    binary = llama_server or supervise.find_llama_server(config.supervisor.llama_server)
    prometheus = shutil.which("prometheus") if config.supervisor.prometheus_listen else None
    if config.supervisor.prometheus_listen and not prometheus:
        click.echo("prometheus: not on PATH, not run (Debian: apt-get install prometheus; make up does it)")
    try:
        programs = supervise.Programs(binary, prometheus, rpc_server=find_rpc_server(binary))
        action = supervise.up(config, path, paths, programs, timeout=timeout)
    except supervise.SuperviseError as e:
        raise click.ClickException(f"{e}\n  logs: {paths.log_dir}") from None
    click.echo(f"stack {action}: supervisord.conf in {paths.root}")
    if prometheus:
        click.echo(f"Prometheus: http://{config.supervisor.prometheus_listen}")
    for line in up_hints(config, path, paths):
        click.echo(line)


def _as_typed(path: Path, cwd: Path) -> str:
    """`path` as a person types it in `cwd`: relative below it, else absolute."""
    try:
        rel = Path(os.path.abspath(path)).relative_to(cwd)
    except ValueError:
        return shlex.quote(str(path))
    return shlex.quote(str(rel) if len(rel.parts) > 1 else f"./{rel}")


def _venv_command(name: str, cwd: Path) -> str:
    """This installation's `name` script (orchestrator, supervisorctl) as typed in `cwd`:
    its bare name only when PATH finds this very one, e.g. in an activated venv."""
    script = Path(sys.executable).parent / name
    if not os.access(script, os.X_OK):
        return name
    on_path = shutil.which(name)
    if on_path and Path(on_path).resolve() == script.resolve():
        return name
    return _as_typed(script, cwd)


def up_hints(config: Config, config_path: Path, paths: supervise.StackPaths) -> list[str]:
    """The lines `up` ends with: how to point Claude Code at the gateway and look at the
    stack, each command as it works when typed where `up` ran (`make up`: the checkout).
    A line indented by two spaces is a command (up to `  # `); elsewhere commands are in
    backticks."""
    cwd = Path.cwd()
    orch = _venv_command("orchestrator", cwd)
    ctl = _venv_command("supervisorctl", cwd)
    custom = config_path.resolve() != Path(_default_config()).resolve()
    config_arg = f" --config {_as_typed(config_path, cwd)}" if custom else ""
    make = cwd.resolve() == REPO and (REPO / "Makefile").is_file()
    rows: list[tuple[str, str]] = []
    if make:
        make_config = f" CONFIG={_as_typed(config_path, cwd)}" if custom else ""
        rows.append((f"make claude{make_config}",
                     f"flags in ARGS: `make claude{make_config} ARGS=\"--resume ID\"`"))
        rows.append((f"{orch} claude{config_arg}", "the same without make; flags follow claude"))
    else:
        rows.append((f"{orch} claude{config_arg}", "flags after claude go to Claude Code"))
    rows.append((f'eval "$({orch} env{config_arg})"; claude', "in this shell; then `claude --resume ID` works too"))
    width = max(len(cmd) for cmd, _ in rows) + 2
    g = config.gateway
    lines = [f"Gateway: {g.url}. Claude Code on it, typed in {cwd}:"]
    lines += [f"  {cmd.ljust(width)}# {note}" for cmd, note in rows]
    if claude_env.find_claude() is None:
        install = "`make claude` installs it" if make else \
            f"`{_as_typed(REPO / 'deploy' / 'install-claude-code.sh', cwd)}` installs it"
        lines.append(f"Claude Code is not installed yet: {install} (it needs Node.js and npm).")
    # The live page; with a key, the browser needs the login link `orchestrator dashboard` prints.
    login = f"; log in with `{orch} dashboard{config_arg}`" if g.api_key else ""
    lines.append(f"The live page: {g.url}/dashboard{login}.")
    conf = "" if paths.conf.parent == cwd else f" -c {_as_typed(paths.conf, cwd)}"
    if make and not custom:
        lines.append(f"The stack: `make status`, `make logs`, `make down`; supervisord: `{ctl}{conf} status`.")
    else:
        lines.append(f"The stack: `{orch} status{config_arg}`, `{orch} down{config_arg}`; "
                     f"supervisord: `{ctl}{conf} status`.")
    return lines


@main.command()
@config_option
def down(config_path) -> None:
    """Stop every program of the stack and supervisord."""
    config, path = _load(config_path)
    try:
        stopped = supervise.down(_paths(config, path))
    except supervise.SuperviseError as e:
        raise click.ClickException(str(e)) from None
    click.echo("stack stopped" if stopped else "stack was not running")


@main.command()
@config_option
def status(config_path) -> None:
    """Programs, backends, queues and restarts, in the terminal."""
    config, path = _load(config_path)
    paths = _paths(config, path)
    try:
        click.echo(status_view.render(config, paths))
    except status_view.GatewayRefused as e:
        raise click.ClickException(str(e)) from None


@main.command()
@config_option
@click.option("--grafana", "with_grafana", is_flag=True,
              help="Also start Grafana (needs a Docker engine) with the Prometheus dashboard.")
@click.option("--port", default=3000, show_default=True, help="Grafana's port on 127.0.0.1.")
def dashboard(config_path, with_grafana, port) -> None:
    """The gateway's live page: prints its URL (with a one-time login when the gateway has a key),
    opens it where a desktop browser is; --grafana starts Grafana too."""
    config, _ = _load(config_path)
    url = page.login_url(config.gateway.url, config.gateway.api_key)
    note = f" (a login link: once, within {page.TICKET_SECONDS} s)" if config.gateway.api_key else ""
    click.echo(f"Dashboard: {url}{note}")
    if _desktop():
        webbrowser.open(url)
    if not with_grafana:
        return
    listen = config.supervisor.prometheus_listen or "127.0.0.1:9091"
    try:
        grafana_url = grafana.start_grafana(f"http://{listen}", port=port)
    except grafana.NoDockerEngine as e:
        click.echo(f"No Docker engine answered ({str(e)[:100]}); for the same figures in the terminal "
                   f"run: `make status` (or `{_venv_command('orchestrator', Path.cwd())} status`)")
        raise SystemExit(1) from None
    click.echo(f"Grafana: {grafana_url}")


def _desktop() -> bool:
    """A graphical session to open a browser in: never a text browser in this terminal, nor on a server."""
    return sys.platform == "darwin" or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _gateway_health(config: Config) -> dict:
    try:
        health = status_view.fetch_health(config)
    except status_view.GatewayRefused as e:
        raise click.ClickException(str(e)) from None
    if health is None:
        g = config.gateway
        raise click.ClickException(f"the gateway is not running at {g.url} (start it with `make up` in the "
                                   f"checkout, or `{_venv_command('orchestrator', Path.cwd())} serve`)")
    return health


@main.command()
@config_option
def env(config_path) -> None:
    """Print `export` lines that point Claude Code at the running gateway."""
    config, _ = _load(config_path)
    for key, value in claude_env.claude_environment(config, _gateway_health(config)).items():
        click.echo(f"export {key}={shlex.quote(value)}")
    # Claude Code's folder first on PATH: `claude`, and its own hint `claude --resume ID`,
    # then run the copy `make up` installed in the cache, which is on no PATH.
    binary = claude_env.find_claude()
    if binary is None:
        click.echo("Claude Code is not installed: deploy/install-claude-code.sh (make claude does it)", err=True)
    else:
        click.echo(claude_env.path_export(binary))


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@config_option
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def claude(config_path, args) -> None:
    """Start Claude Code pointed at the running gateway; ARGS go to `claude`."""
    config, _ = _load(config_path)
    env = claude_env.claude_environment(config, _gateway_health(config))
    binary = claude_env.find_claude()
    if binary is None:
        raise click.ClickException("Claude Code is not installed: `make claude` in the checkout installs it "
                                   "(deploy/install-claude-code.sh), or `npm install -g @anthropic-ai/claude-code`")
    # A real Anthropic key in the environment would go to the gateway (never further) for nothing.
    inherited = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
    os.execvpe(binary, [binary, *args], {**inherited, **env})


@main.command(hidden=True)
@click.option("--gateway-url", required=True)
@click.option("--secret-file", type=click.Path(dir_okay=False), default=None,
              help="The secret that proves this listener to the gateway.")
def events(gateway_url, secret_file) -> None:
    """supervisord event listener (run by supervisord, not by hand)."""
    from . import events as listener

    secret = Path(secret_file).read_text().strip() if secret_file else ""
    listener.run(listener.post_to(gateway_url, secret))
