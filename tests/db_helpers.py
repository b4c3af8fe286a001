"""Throwaway databases, roles and connections on the session's embedded Postgres."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql
from tenantry_devenv.services import Postgres

Conn = psycopg.Connection[Any]


def unique(prefix: str) -> str:
    """A fresh name that is also a valid tenant id (lowercase letters and hex digits)."""
    return f"{prefix}{secrets.token_hex(4)}"


def connect(pg: Postgres, dbname: str, user: str = "postgres",
            password: str | None = None) -> Conn:
    return psycopg.connect(pg.dsn(dbname, user, password), autocommit=True, connect_timeout=5)


@contextmanager
def scratch_database(pg: Postgres, prefix: str = "t") -> Iterator[str]:
    """A new database, dropped (sessions and all) afterwards."""
    name = unique(prefix)
    with connect(pg, "postgres") as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        with connect(pg, "postgres") as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))


def drop_roles(pg: Postgres, roles: list[str]) -> None:
    """Drop cluster-wide roles left by a test (after its database is gone)."""
    with connect(pg, "postgres") as admin:
        for role in roles:
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def create_login_role(admin: Conn, role: str, password: str, *member_of: str) -> None:
    admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
        sql.Identifier(role), sql.Literal(password)))
    for group in member_of:
        admin.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(group),
                                                      sql.Identifier(role)))


def scalar(conn: Conn, query: Any, params: Any = None) -> Any:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def relation_exists(conn: Conn, qualified: str) -> bool:
    return scalar(conn, "SELECT to_regclass(%s) IS NOT NULL", (qualified,)) is True


def q(template: str, **names: str) -> sql.Composed:
    """SQL whose {placeholders} are filled with (optionally schema-qualified) identifiers."""
    return sql.SQL(template).format(
        **{key: sql.Identifier(*value.split(".")) for key, value in names.items()})
