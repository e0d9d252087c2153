"""supervisord's XML-RPC interface, as the gateway's health watch and the operator's tools ask it."""

from __future__ import annotations

import xmlrpc.client
from pathlib import Path


def rpc_at(socket: str | Path):
    """supervisord's XML-RPC interface over its unix socket."""
    from supervisor.xmlrpc import SupervisorTransport

    transport = SupervisorTransport(None, None, f"unix://{socket}")
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor
