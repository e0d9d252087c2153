"""`orchestrator dashboard`: Grafana with the project's provisioning, through the Docker SDK."""

from __future__ import annotations

from pathlib import Path
from typing import Any

GRAFANA_IMAGE = "grafana/grafana:11.3.0"
CONTAINER_NAME = "orchestrator-grafana"
GRAFANA_DIR = Path(__file__).resolve().parents[2] / "grafana"


def grafana_container_spec(prometheus_url: str, *, grafana_dir: Path = GRAFANA_DIR, port: int = 3000) -> dict[str, Any]:
    """Keyword arguments for docker's `containers.run`: Grafana on 127.0.0.1:port with the
    datasource (fixed uid) pointing at the bundled Prometheus and the dashboard provisioned."""
    return {
        "image": GRAFANA_IMAGE,
        "name": CONTAINER_NAME,
        "detach": True,
        # The stack and its Prometheus listen on loopback only.
        "network_mode": "host",
        "environment": {
            "PROMETHEUS_URL": prometheus_url,
            "GF_SERVER_HTTP_ADDR": "127.0.0.1",
            "GF_SERVER_HTTP_PORT": str(port),
            "GF_AUTH_ANONYMOUS_ENABLED": "true",
            "GF_AUTH_ANONYMOUS_ORG_ROLE": "Viewer",
            "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH": "/var/lib/grafana/dashboards/orchestrator.json",
        },
        "volumes": {
            str(grafana_dir / "provisioning"): {"bind": "/etc/grafana/provisioning", "mode": "ro"},
            str(grafana_dir / "dashboards"): {"bind": "/var/lib/grafana/dashboards", "mode": "ro"},
        },
        "restart_policy": {"Name": "unless-stopped"},
    }


def dashboard_url(port: int = 3000) -> str:
    return f"http://127.0.0.1:{port}/d/orchestrator"


def start_grafana(prometheus_url: str, *, port: int = 3000, client: Any = None) -> str:
    """Start (or reuse) the Grafana container; returns the dashboard URL.
    Raises `NoDockerEngine` when no engine answers."""
    import docker
    from docker.errors import DockerException, NotFound

    try:
        client = client or docker.from_env()
        client.ping()
    except DockerException as e:
        raise NoDockerEngine(str(e)) from None
    try:
        existing = client.containers.get(CONTAINER_NAME)
    except NotFound:
        existing = None
    if existing is not None:
        if existing.status != "running":
            existing.start()
    else:
        client.containers.run(**grafana_container_spec(prometheus_url, port=port))
    return dashboard_url(port)


class NoDockerEngine(RuntimeError):
    pass
