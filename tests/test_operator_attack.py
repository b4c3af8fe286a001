"""Adversarial tests of the operator's data plane: what a hostile tenant workload can do.

Complements test_attack.py (database logins) and test_network_policies.py (traffic paths).
"""

from __future__ import annotations

import secrets
import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from tenantry_devenv.services import Postgres
from tenantry_operator import builders

_SSL_REQUEST, _GSSENC_REQUEST = 80877103, 80877104


def _read_exact(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("client closed")
        data += chunk
    return data


@contextmanager
def server_asking_for_a_clear_text_password() -> Iterator[tuple[int, list[bytes]]]:
    """A socket that speaks just enough of the Postgres protocol to ask the client for its
    password in clear text, as a tenant's Pod labelled like the silo could (the silo Service
    selects by labels any Pod of the namespace may carry). Yields its port and what it got."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    received: list[bytes] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            try:
                while True:  # SSL/GSS requests first (refused), then the startup message
                    (length,) = struct.unpack("!i", _read_exact(conn, 4))
                    body = _read_exact(conn, length - 4)
                    if struct.unpack("!i", body[:4])[0] in (_SSL_REQUEST, _GSSENC_REQUEST):
                        conn.sendall(b"N")
                        continue
                    break
                conn.sendall(b"R" + struct.pack("!ii", 8, 3))  # AuthenticationCleartextPassword
                kind = _read_exact(conn, 1)
                (length,) = struct.unpack("!i", _read_exact(conn, 4))
                received.append(kind + _read_exact(conn, length - 4))
            except (ConnectionError, OSError):
                return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], received
    finally:
        listener.close()
        thread.join(10)


def _at(dsn: str, port: int) -> str:
    """`dsn` with its Service host swapped for 127.0.0.1:`port` (every other option kept)."""
    params = conninfo_to_dict(dsn)
    params.update(host="127.0.0.1", port=str(port))
    return make_conninfo("", **params)


def test_a_pod_posing_as_the_silo_never_receives_the_admin_password(
        shared_database: str, postgres: Postgres) -> None:
    password = secrets.token_urlsafe(24)
    dsn = builders.silo_admin_dsn("tenant-victim", password)
    with server_asking_for_a_clear_text_password() as (port, received), \
            pytest.raises(psycopg.OperationalError):
        psycopg.connect(_at(dsn, port), connect_timeout=5).close()
    assert not any(password.encode() in message for message in received), (
        "the operator sent the silo admin password in clear text to a server that asked")
    # A real server (SCRAM, as the silo image) still accepts the same DSN.
    real = _at(builders.silo_admin_dsn("tenant-victim", postgres.password), postgres.port)
    with psycopg.connect(real, connect_timeout=5) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
