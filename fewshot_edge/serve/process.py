"""Run ``fewshot-edge serve`` in a child process on a free loopback port, for tests, benchmarks and
scripts: started, waited for until ``/health`` answers, and stopped, all bounded in time."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

_CLI = "from fewshot_edge.cli import main; main(prog_name='fewshot-edge')"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS's pick)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def serving(
    store: str | Path,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    log: str | Path | None = None,
    timeout: float = 120.0,
) -> Iterator[str]:
    """``fewshot-edge serve --store STORE --port P ARGS`` on 127.0.0.1 in a child process; yields its base
    URL once ``/health`` answers (a RuntimeError with the server's output if it exits or ``timeout``
    passes first); stopped (SIGTERM, then SIGKILL after 10 s) on exit. Output goes to ``log`` (default:
    discarded)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-c", _CLI, "serve", "--store", str(store), "--port", str(port), *args]
    with open(log or os.devnull, "w", encoding="utf-8") as out:
        child = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, text=True
        )
        try:
            _wait_healthy(child, url, timeout, log)
            yield url
        finally:
            child.terminate()
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(10)


def _wait_healthy(child: subprocess.Popen[str], url: str, timeout: float, log: str | Path | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            said = Path(log).read_text(encoding="utf-8").strip() if log else "(no log kept)"
            raise RuntimeError(f"fewshot-edge serve exited with {child.returncode}: {said}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"fewshot-edge serve did not answer at {url}/health within {timeout:.0f} s")
