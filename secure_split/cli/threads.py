"""Thread policy for peer processes, applied before torch is imported.

Several peers on one host fight for its cores: OpenMP threads of a peer that waits on the
network spin on the cores the others need (a 3-hop chain on loopback ran 20-100x slower with
torch's default threads). Each peer therefore gets its share of the cores and a passive wait
policy. This must run before the first `import torch` in the process.
"""

from __future__ import annotations

import os
import sys


def local_peer_count(endpoints: list[str]) -> int:
    """How many of the deployment's endpoints are on this host (loopback or localhost)."""
    local = ("tcp://127.", "tcp://localhost:", "tcp://[::1]:")
    return max(1, sum(1 for e in endpoints if e.startswith(local)))


def choose_threads(requested: int | str, endpoints: list[str]) -> int:
    """Resolve a `threads` setting: an int, or 'auto' = this host's cores shared among its peers."""
    if isinstance(requested, int):
        return max(1, requested)
    if str(requested).isdigit():
        return max(1, int(requested))
    cores = os.cpu_count() or 1
    return max(1, cores // local_peer_count(endpoints))


def apply_thread_policy(threads: int) -> None:
    """Set OpenMP/MKL thread counts and a passive wait policy for this process.

    Raises:
        RuntimeError: torch was imported already, so the setting would not take effect.
    """
    if "torch" in sys.modules:
        raise RuntimeError("apply_thread_policy must run before torch is imported")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
