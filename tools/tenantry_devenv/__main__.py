"""`python -m tenantry_devenv cluster-up|cluster-down|demo`: the local development environment."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from .controlplane import REPO_ROOT, ControlPlane, start_control_plane
from .processes import stop_on_signals

# TENANTRY_DEV_STATE moves it, e.g. to a temporary directory in tests.
STATE_DIR = Path(os.environ.get("TENANTRY_DEV_STATE") or REPO_ROOT / ".tenantry-dev")


def cluster_up() -> int:
    if (STATE_DIR / "cluster" / "state.json").exists():
        plane = ControlPlane.load_state(STATE_DIR / "cluster")
        if all(p.alive() for p in plane.processes):
            print(f"already running; export KUBECONFIG={plane.kubeconfig}")  # noqa: T201
            return 0
        plane.stop()
    shutil.rmtree(STATE_DIR / "cluster", ignore_errors=True)
    plane = start_control_plane(STATE_DIR / "cluster", detached=True)
    try:
        plane.install_crds()
        plane.save_state()
    except BaseException:  # a failure or a signal: leave nothing running that is not recorded
        plane.stop()
        raise
    print(f"control plane up: {plane.server}\nexport KUBECONFIG={plane.kubeconfig}")  # noqa: T201
    return 0


def cluster_down() -> int:
    state = STATE_DIR / "cluster"
    if (state / "state.json").exists():
        ControlPlane.load_state(state).stop()
    shutil.rmtree(state, ignore_errors=True)
    print("control plane stopped")  # noqa: T201
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tenantry_devenv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("cluster-up", help="start the local control plane and install the CRDs")
    sub.add_parser("cluster-down", help="stop it and remove its state")
    demo = sub.add_parser("demo", help="everything on embedded defaults, two sample tenants")
    demo.add_argument("--keep", action="store_true", help="keep running until Ctrl-C")
    args = parser.parse_args(argv)
    stop_on_signals()
    if args.command == "cluster-up":
        return cluster_up()
    if args.command == "cluster-down":
        return cluster_down()
    from .demo import run_demo

    return run_demo(STATE_DIR / "demo", keep=args.keep)


if __name__ == "__main__":
    sys.exit(main())
