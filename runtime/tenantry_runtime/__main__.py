"""`python -m tenantry_runtime [--host H] [--port P]`: serve the runtime with uvicorn."""

from __future__ import annotations

import argparse
import logging

from .app import run_with_uvicorn
from .settings import get_settings


def main() -> None:
    parser = argparse.ArgumentParser(description="Tenantry runtime")
    parser.add_argument("--host", default="0.0.0.0")  # noqa: S104 - a server in a Pod
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    run_with_uvicorn(get_settings(), args.host, args.port)


if __name__ == "__main__":
    main()
