"""A clear condition when Postgres or Redis cannot be reached, instead of an exception's name."""

from __future__ import annotations

import psycopg
from redis import exceptions as redis_errors

from .conditions import Condition

# A lost or refused server: class 08 (connection exception), and of class 57 the shutdowns and
# "cannot connect now" (starting, recovering), not 57014 (a cancelled or timed-out query). A
# connection that fails before any SQLSTATE is exchanged (refused, timed out) raises
# psycopg.OperationalError without one.
_UNREACHABLE_SQLSTATES = ("08", "57P01", "57P02", "57P03")


def unreachable_condition(condition_type: str, err: BaseException) -> Condition | None:
    """The condition to report when `err` says a server is unreachable; None otherwise."""
    if isinstance(err, psycopg.OperationalError) and (
            err.sqlstate is None or err.sqlstate.startswith(_UNREACHABLE_SQLSTATES)):
        return Condition(condition_type, False, "DatabaseUnreachable",
                         f"cannot reach Postgres ({_first_line(err)}); nothing further is"
                         " provisioned until it answers, retrying")
    if isinstance(err, (redis_errors.ConnectionError, redis_errors.TimeoutError)):
        return Condition(condition_type, False, "RedisUnreachable",
                         f"cannot reach Redis ({_first_line(err)}); nothing further is"
                         " provisioned until it answers, retrying")
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]
