"""A config read from TOML and the environment, checked, described, and the example file written:
all from the declarations in config.py."""

from __future__ import annotations

import fnmatch
import json
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import MISSING, fields, replace
from pathlib import Path
from typing import Any

from .config import (
    ENV_PREFIX,
    SYNTHETIC,
    TABLES,
    BackendConfig,
    Config,
    ConfigError,
    GatewayConfig,
    is_loopback_host,
    same_server_key,
)

# ---- reading, from the declarations ------------------------------------------------------------

_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _kind(cls: type, name: str) -> tuple[type, bool]:
    """(base type, optional) of a declared key; tuples of strings are `tuple`."""
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
    return (tuple if typing.get_origin(hint) is tuple else hint), optional


def _convert(value: Any, kind: type) -> tuple[bool, Any]:
    """The value as `kind`, or (False, None). An int is a float; a bool is never a number."""
    if kind is tuple:
        ok = isinstance(value, list) and all(isinstance(v, str) and v for v in value)
        return ok, tuple(value) if ok else None
    if isinstance(value, bool) and kind is not bool:
        return False, None
    if kind is float and isinstance(value, int):
        return True, float(value)
    return isinstance(value, kind), value


def _read_table(cls: type, raw: Any, path: str, problems: list[str]) -> dict[str, Any]:
    """The declared keys of one table, checked; missing required keys and unknown keys are problems."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{path}: must be a table")
        return {}
    known = [f.name for f in fields(cls)]
    for k in sorted(set(raw) - set(known)):
        problems.append(f"{path}.{k}: unknown key (known: {', '.join(sorted(known))})")
    out: dict[str, Any] = {}
    for f in fields(cls):
        meta = f.metadata
        if f.name not in raw:
            if f.default is MISSING:
                problems.append(f"{path}.{f.name}: required")
            continue
        kind, optional = _kind(cls, f.name)
        ok, value = _convert(raw[f.name], kind)
        if ok and meta["check"] is not None and not meta["check"](value):
            ok = False
        if not ok:
            what = meta["why"] or ("a list of non-empty strings" if kind is tuple else _KIND_NAMES[kind])
            problems.append(f"{path}.{f.name}: must be {what}, got {raw[f.name]!r}")
            continue
        out[f.name] = meta["normalize"](value) if meta["normalize"] else value
    return out


def env_name(table: str, key: str) -> str:
    return f"{ENV_PREFIX}{table}_{key}".upper()


def _env_value(text: str, kind: type) -> Any:
    """An environment string as the key's type; a value that does not read stays a string (and fails the check)."""
    if kind is bool:
        return {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}.get(text.lower(), text)
    if kind is tuple:
        return [p.strip() for p in text.split(",") if p.strip()]
    for conv in ((int,) if kind is int else (int, float) if kind is float else ()):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def env_overrides(env: Mapping[str, str]) -> dict[str, dict[str, tuple[str, Any]]]:
    """`ORCHESTRATOR_<TABLE>_<KEY>` (and a key's extra name) for every key of the single tables:
    {table: {key: (the variable's name, its value)}}."""
    out: dict[str, dict[str, tuple[str, Any]]] = {}
    for table, cls in TABLES.items():
        for f in fields(cls):
            for name in (env_name(table, f.name), f.metadata["env"]):
                if name and env.get(name):
                    out.setdefault(table, {})[f.name] = (name, _env_value(env[name], _kind(cls, f.name)[0]))
    return out


def exposure_problem(gateway: GatewayConfig) -> str | None:
    """A gateway others can reach must check a key, unless told plainly that it runs open."""
    if is_loopback_host(gateway.host) or gateway.api_key or gateway.open:
        return None
    return (f"gateway.host: {gateway.host!r} is reachable from other machines; set gateway.api_key (or "
            f"ORCHESTRATOR_API_KEY, or --api-key) so only you get in, or gateway.open = true (--open) to serve "
            f"anyone who can reach it")


def config_from_dict(raw: dict[str, Any], source: str = "config", env: Mapping[str, str] | None = None) -> Config:
    """A Config from a TOML document's data, with `env`'s overrides on top; every problem at once."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError(["must be a table"], source)
    for k in sorted(set(raw) - {*TABLES, "backends"}):
        problems.append(f"{k}: unknown table (known: {', '.join(sorted([*TABLES, 'backends']))})")
    overrides = env_overrides(env or {})
    tables = {}
    for name, cls in TABLES.items():
        raw_table = raw.get(name)
        from_env = overrides.get(name, {})
        if from_env:
            raw_table = {**(raw_table if isinstance(raw_table, dict) else {}),
                         **{k: v for k, (_, v) in from_env.items()}}
        seen = len(problems)
        tables[name] = cls(**_read_table(cls, raw_table, name, problems))
        for i in range(seen, len(problems)):  # say where a bad value came from
            key = problems[i].split(":", 1)[0].removeprefix(f"{name}.")
            if key in from_env:
                problems[i] += f" (from {from_env[key][0]})"

    backends: list[BackendConfig] = []
    raw_backends = raw.get("backends")
    if raw_backends is None:
        backends = list(Config().backends)
    elif not isinstance(raw_backends, list) or not raw_backends:
        problems.append("backends: must be a non-empty array of tables ([[backends]])")
    else:
        for i, rb in enumerate(raw_backends):
            values = _read_table(BackendConfig, rb, f"backends[{i}]", problems)
            values.setdefault("name", f"backend{i}")
            values.setdefault("url", "")
            backends.append(BackendConfig(**values))
        problems += _backend_problems(backends)

    routing, claude = tables["routing"], tables["claude"]
    if routing.background != SYNTHETIC:
        match = [b for b in backends if b.name == routing.background]
        if not match:
            problems.append(f"routing.background: {routing.background!r} names no backend "
                            f'(use "synthetic" or a backend name)')
        elif match[0].role != "background":
            problems.append(f'routing.background: backend {routing.background!r} must have role = "background"')
        elif routing.background_work and not match[0].work_capable:
            # Said at once: the switch would otherwise do nothing, silently.
            problems.append(f"routing.background_work: backend {routing.background!r} is not declared "
                            f"work_capable = true (a title model cannot do an agent's work)")
    elif routing.background_work:
        problems.append('routing.background_work: routing.background is "synthetic"; name a work_capable '
                        "background backend there")
    if not any(fnmatch.fnmatchcase(claude.small_model.lower(), p.lower()) for p in routing.background_models):
        problems.append(f"claude.small_model: {claude.small_model!r} matches none of routing.background_models "
                        f"{list(routing.background_models)}, so work under that name (Claude Code's agents) "
                        f"would be told from main work neither in metrics nor by routing.background_work")
    if problems:
        raise ConfigError(problems, source)
    return Config(backends=tuple(backends), **tables)


def _backend_problems(backends: list[BackendConfig]) -> list[str]:
    problems = []
    names = [b.name for b in backends]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"backends: name {dup!r} is used more than once")
    # Each backend keeps an index of its save folder (kv/folder.py) and removes the files no save of
    # its own names: two in one folder would remove each other's saves.
    folders = [os.path.normpath(b.kv_save_dir) for b in backends if b.kv_save_dir]
    for dup in sorted({f for f in folders if folders.count(f) > 1}):
        problems.append(f"backends: kv_save_dir {dup!r} is used by more than one backend")
    # Two backends on one server would each count its slots: two generations at once.
    by_url: dict[str, list[str]] = {}
    for b in backends:
        if b.url:
            by_url.setdefault(same_server_key(b.url), []).append(b.name)
    for key, on_it in sorted(by_url.items()):
        if len(on_it) > 1:
            problems.append(f"backends: {', '.join(repr(n) for n in on_it)} have the same URL ({key}); "
                            f"one server is one backend (give it more slots instead)")
    if not any(b.role == "main" for b in backends):
        problems.append('backends: at least one backend needs role = "main"')
    return problems


# ---- the documented example, from the declarations -----------------------------------------------

def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def _key_lines(cls: type, *, values: Mapping[str, Any] | None = None) -> list[str]:
    lines = []
    for f in fields(cls):
        meta = f.metadata
        value = (values or {}).get(f.name, f.default)
        comment = meta["doc"]
        if meta["env"]:
            comment += f"; or {meta['env']}"
        if value is MISSING or value is None:
            line = f"# {f.name} = {_toml(meta['example'])}"
            comment += " (example)"
        else:
            line = f"{f.name} = {_toml(value)}"
        lines.append(f"{line:<40} # {comment}")
    return lines


def render_example() -> str:
    """The example configuration file: every key, its default and what it does."""
    out = ["# orchestrator configuration: every key, with its default and what it does.",
           "# Generated from orchestrator/config.py by `orchestrator example-config`; do not edit by hand.",
           "# Every key is optional but a backend's name and url. Check a file: orchestrator check-config FILE",
           "# Each key of the single tables can be set from the environment too: ORCHESTRATOR_<TABLE>_<KEY>,",
           "# for example ORCHESTRATOR_GATEWAY_PORT=9191.", ""]
    for table, cls in TABLES.items():
        out += [f"[{table}]", *_key_lines(cls), ""]
    out += ["# The main model. The gateway never sends a backend more requests than it has slots: by",
            "# default as many as the engine runs. Add [[backends]] tables for a pool (same models)",
            '# or a small model for background requests (role = "background", named in routing.background).',
            "[[backends]]", *_key_lines(BackendConfig, values={"name": "primary", "url": "http://127.0.0.1:8080"}),
            ""]
    return "\n".join(out)


def describe(config: Config) -> list[str]:
    """What check-config reports: the backends, and every key that differs from its default (secrets as ***)."""
    lines = [f"backend {b.name}: {b.url} role={b.role} slots={b.slots or 'from the engine'} models={list(b.models)}"
             + (" (supervised)" if b.command else "") for b in config.backends]
    lines.append(f"background: {config.routing.background}")
    for table, cls in TABLES.items():
        value = getattr(config, table)
        for f in fields(cls):
            v = getattr(value, f.name)
            if v != f.default:
                lines.append(f"{table}.{f.name} = {'***' if f.metadata['secret'] else _toml(v)}")
    return lines


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError([f"file not found: {path}"], str(path)) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"not valid TOML: {e}"], str(path)) from None
    return config_from_dict(raw, str(path), env)


def with_overrides(config: Config, gateway: Mapping[str, Any] | None = None,
                   supervisor: Mapping[str, Any] | None = None) -> Config:
    """The config with command-line and environment values on top, by table (`[gateway]`'s host, port,
    api_key and open; `[supervisor]`'s socket, log_dir and events_secret_file); a None value (and an
    empty api key) is one not given. Checked again as a whole."""
    given = {k: v for k, v in (gateway or {}).items() if v is not None and (v or k != "api_key")}
    if len(given.get("api_key", "12345678")) < 8:
        raise ConfigError(["api key: must be at least 8 characters"], "command line")
    gateway_config = replace(config.gateway, **given)
    exposed = exposure_problem(gateway_config)
    if exposed:
        raise ConfigError([exposed], "command line")
    supervisor_config = replace(config.supervisor,
                                **{k: v for k, v in (supervisor or {}).items() if v is not None})
    return replace(config, gateway=gateway_config, supervisor=supervisor_config)
