"""`orchestrator events`: a supervisord event listener that tells the gateway at once
when a backend's process changes state (exits, backs off, is FATAL, runs again).

Without it the gateway still learns the same from connection failures and by
polling supervisord; with it, a crash of an idle backend holds its queue before
the next request meets a refused connection.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import TextIO

from supervisor.childutils import get_headers, listener

from ..http.access import SECRET_HEADER

PREFIX = "PROCESS_STATE_"


def parse(headers: dict[str, str], payload: str) -> dict | None:
    """{program, state, pid} from a PROCESS_STATE_* event of a backend program (a llama-server, or one
    of its RPC workers), else None."""
    event = headers.get("eventname", "")
    if not event.startswith(PREFIX):
        return None
    body = get_headers(payload.split("\n", 1)[0])
    program = body.get("processname", "")
    if not program.startswith(("llama-", "rpc-")):
        return None
    pid = body.get("pid")
    return {"program": program, "state": event[len(PREFIX):], "pid": int(pid) if pid and pid.isdigit() else None}


def post_to(gateway_url: str, secret: str = "") -> Callable[[dict], None]:
    def post(event: dict) -> None:
        req = urllib.request.Request(gateway_url.rstrip("/") + "/internal/process-event",
                                     data=json.dumps(event).encode(), method="POST",
                                     headers={"Content-Type": "application/json", SECRET_HEADER: secret})
        try:
            urllib.request.urlopen(req, timeout=2).close()
        except (OSError, urllib.error.URLError) as e:
            # The gateway may be restarting; it polls supervisord too.
            print(f"could not tell the gateway about {event}: {e}", file=sys.stderr, flush=True)
    return post


def run(post: Callable[[dict], None], stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout,
        limit: int | None = None) -> None:
    """The listener loop; always acknowledges, so supervisord never buffers events for us."""
    handled = 0
    while limit is None or handled < limit:
        headers, payload = listener.wait(stdin, stdout)
        event = parse(headers, payload)
        if event is not None:
            print(f"{event['program']}: {event['state']} pid {event['pid']}", file=sys.stderr, flush=True)
            post(event)
        listener.ok(stdout)
        handled += 1
