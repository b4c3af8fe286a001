"""Start, watch and stop the local server processes of the development environment."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

# The signals that end a development-environment command: `kill`, a closed terminal, Ctrl-C.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


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


def _ignore_signal(signum: int, frame: FrameType | None) -> None:
    """A handler that does nothing: unlike SIG_IGN it is not inherited by later children."""


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    # A second signal must not interrupt the cleanup that the first one started.
    for sig in STOP_SIGNALS:
        signal.signal(sig, _ignore_signal)
    raise SystemExit(128 + signum)


def stop_on_signals() -> None:
    """Turn SIGTERM, SIGHUP and SIGINT into SystemExit, so every `finally` stops its servers.

    Python's default for SIGTERM and SIGHUP ends the process on the spot, skipping them, and
    the servers run in sessions of their own, so no terminal signal reaches them either.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, _exit_on_signal)


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that makes the child get SIGKILL when this process dies (Linux only).

    The last resort when the parent is killed without running its cleanup (SIGKILL, a crash).
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the child only calls it
    parent = os.getpid()

    def preexec() -> None:
        # Runs after the switch to another user (Popen's `user=`), which would clear it.
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


@dataclass
class Process:
    """One server process in a session of its own (so Process.stop can kill its whole group)."""

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
    die_with_parent: bool = True,
) -> Process:
    """Start a server; it dies with this process unless `die_with_parent` is False (cluster-up
    leaves its servers running for later commands)."""
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
            preexec_fn=_die_with_parent() if die_with_parent else None,
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
