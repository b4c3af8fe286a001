"""Start, watch and stop the local server processes of the development environment."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


class StartupError(RuntimeError):
    """A server did not come up; the message carries the tail of its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"(no log at {path})"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


@dataclass
class Process:
    """One server process, detached into its own session so it can outlive `make cluster-up`."""

    name: str
    pid: int
    log: Path

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        try:  # a zombie child still answers kill(0); reap it to tell
            waited, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return True
        return waited == 0

    def stop(self, timeout: float = 15.0) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if not self.alive():
                    return
                time.sleep(0.1)


def spawn(
    name: str,
    argv: Sequence[str | Path],
    log: Path,
    *,
    env: dict[str, str] | None = None,
    user: str | None = None,
) -> Process:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [str(a) for a in argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **(env or {})},
            user=user,
        )
    return Process(name=name, pid=proc.pid, log=log)


def wait_until(
    what: str, check: Callable[[], bool], process: Process | None, timeout: float
) -> None:
    """Poll `check` until it is true; fail with the process's log tail if it dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and not process.alive():
            raise StartupError(f"{process.name} exited while waiting for {what}:\n"
                               f"{log_tail(process.log)}")
        try:
            if check():
                return
        except Exception:  # noqa: S110 - not ready yet; the timeout reports the failure
            pass
        time.sleep(0.2)
    tail = log_tail(process.log) if process else ""
    raise StartupError(f"timed out after {timeout:.0f}s waiting for {what}\n{tail}")
