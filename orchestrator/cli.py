"""The `orchestrator` command: a thin click layer over the library."""

from __future__ import annotations

import logging

import click

from . import __version__
from .config import SYNTHETIC, Config, ConfigError, config_from_dict, load_config, \
    with_overrides


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
def serve(config_path, host, port, primary_url, slots, background, log_level) -> None:
    """Run the gateway."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(config_path) if config_path else _one_liner_config(primary_url, slots, background)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    config = with_overrides(config, host=host, port=port)
    from .app import serve as run

    run(config)


@main.command("check-config")
@click.argument("path", type=click.Path(dir_okay=False))
def check_config(path) -> None:
    """Validate a config file and print what it resolves to."""
    try:
        config = load_config(path)
    except ConfigError as e:
        raise click.ClickException("\n  ".join(["invalid config:", *e.problems])) from None
    click.echo(f"{path}: ok")
    for b in config.backends:
        click.echo(f"  backend {b.name}: {b.url} role={b.role} slots={b.slots} models={list(b.models)}")
    click.echo(f"  background: {config.routing.background}")
