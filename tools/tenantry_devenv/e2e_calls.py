"""The tenant apps' half of `make e2e-kind`: SDK calls to the runtime in kind, then usage.

`python -m tenantry_devenv.e2e_calls --kubectl K --kubeconfig C --runtime-url U TENANT...`
reads each tenant's key from its Secret (as its app would), calls the runtime with the official
`anthropic` SDK (non-streaming and streaming; the upstream stub answers) and waits for those
requests' rows in GET /v1/usage. Exits non-zero with the reason on the first failure.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .demo_calls import chat, connect, say, show_usage


@dataclass(frozen=True)
class KindCluster:
    """kubectl against kind's kubeconfig: the `Cluster` the demo's calls take."""

    kubectl_binary: Path
    kubeconfig: Path

    def kubectl(self, *args: str, input_text: str | None = None,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.kubectl_binary), f"--kubeconfig={self.kubeconfig}",
                               *args], input=input_text, capture_output=True, text=True,
                              check=check, timeout=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--kubectl", type=Path, required=True)
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--runtime-url", required=True, help="e.g. http://127.0.0.1:18080")
    parser.add_argument("tenants", nargs="+")
    args = parser.parse_args(argv)
    cluster = KindCluster(args.kubectl, args.kubeconfig)
    try:
        for tenant in args.tenants:
            say(f"\n==> {tenant}: Anthropic(base_url={args.runtime_url}, api_key=<its key>)")
            app = connect(cluster, tenant, args.runtime_url)
            chat(app)
            show_usage(app)
    except Exception as error:  # one line for CI's log, not a traceback
        say(f"e2e calls failed: {type(error).__name__}: {error}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
