import io

from orchestrator.ops import events


def frame(eventname: str, payload: str) -> str:
    header = (f"ver:3.0 server:supervisor serial:1 pool:events poolserial:1 eventname:{eventname} "
              f"len:{len(payload)}\n")
    return header + payload


def test_listener_reports_backend_process_changes_and_acknowledges_all():
    stdin = io.StringIO(
        frame("PROCESS_STATE_EXITED", "processname:llama-primary groupname:llama-primary from_state:RUNNING "
                                      "expected:0 pid:4242")
        + frame("PROCESS_STATE_RUNNING", "processname:gateway groupname:gateway from_state:STARTING pid:7")
        + frame("TICK_5", "when:1")
        + frame("PROCESS_STATE_RUNNING", "processname:llama-primary groupname:llama-primary "
                                         "from_state:STARTING pid:4300"))
    stdout = io.StringIO()
    posted = []
    events.run(posted.append, stdin, stdout, limit=4)
    assert posted == [{"program": "llama-primary", "state": "EXITED", "pid": 4242},
                      {"program": "llama-primary", "state": "RUNNING", "pid": 4300}]
    out = stdout.getvalue()
    assert out.count("READY\n") == 4 and out.count("RESULT 2\nOK") == 4


def test_parse_ignores_events_without_pid_gracefully():
    e = events.parse({"eventname": "PROCESS_STATE_FATAL"},
                     "processname:llama-small groupname:llama-small from_state:BACKOFF")
    assert e == {"program": "llama-small", "state": "FATAL", "pid": None}
