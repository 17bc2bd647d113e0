"""Start `peft-deltamem serve` as a subprocess on a free localhost port and wait until it answers (tests, load
scripts). Standard library only."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_server(args: list[str], timeout: float = 300, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """Run ``peft-deltamem serve *args --port <free>``; returns the process and its base URL once
    ``GET /v1/models`` answers. Raises RuntimeError with the server's output if it exits or does not start in time.
    """
    port = free_port()
    command = [sys.executable, "-m", "peft_deltamem.cli", "serve", *args, "--port", str(port)]
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty server never blocks on a full pipe
    process = subprocess.Popen(
        command, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"the server exited with code {process.returncode}: {log.read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=1) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.2)
    process.kill()
    process.wait()
    log.seek(0)
    raise RuntimeError(f"the server did not answer within {timeout:.0f} s; its output: {log.read()[-3000:]}")
