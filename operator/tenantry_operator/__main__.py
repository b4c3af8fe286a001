"""`python -m tenantry_operator`: run the operator (kopf) with our handlers, cluster-wide."""

from __future__ import annotations

import asyncio

import kopf

from . import handlers  # noqa: F401 - registers the handlers
from .settings import get_settings


def main() -> None:
    asyncio.run(kopf.operator(clusterwide=True, standalone=not get_settings().peering))


if __name__ == "__main__":
    main()
