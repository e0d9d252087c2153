"""What /proc shows of the process behind a backend: a pid's command line, the listener of a loopback
port (vLLM's --max-num-seqs is read there), an option's value."""

import os
import subprocess
import sys

import pytest

from orchestrator.engines.local_process import command_line, listener_command_line, option
from testkit.servers import free_port


def test_a_processs_command_line_is_read_where_linux_shows_it():
    assert sys.executable.rsplit("/", 1)[-1] in command_line(os.getpid())
    assert command_line(None) is None and command_line(2 ** 31) is None


@pytest.fixture
def listener():
    """Another process listening on a loopback port, with a marker in its command line."""
    port = free_port()
    code = ("import socket,sys,time; s=socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); "
            "print('up', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(port), "--max-num-seqs", "7"], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline() == "up\n"
    yield port
    proc.kill()
    proc.wait()


def test_the_listener_of_a_loopback_port_is_found(listener):
    found = listener_command_line(f"http://127.0.0.1:{listener}")
    assert found is not None and option(found, "--max-num-seqs") == "7", found
    assert listener_command_line(f"http://localhost:{listener}/v1") == found
    assert listener_command_line(f"http://127.0.0.1:{free_port()}") is None   # nobody listens there
    assert listener_command_line(f"http://gpu-box.lan:{listener}") is None   # not on this machine


def test_an_options_value_is_its_last_and_either_spelling():
    assert option("vllm serve m --max-num-seqs 4 --max-num-seqs=16", "--max-num-seqs") == "16"
    assert option("vllm serve m --max_num_seqs 3", "--max-num-seqs", "--max_num_seqs") == "3"
    assert option("vllm serve m", "--max-num-seqs") is None and option(None, "--x") is None
    assert option("unbalanced 'quote", "--x") is None and option("a --x", "--x") is None
