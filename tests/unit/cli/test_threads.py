"""Each peer process takes its share of the host's cores and a passive OpenMP wait policy."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from secure_split.cli.threads import choose_threads, local_peer_count

LOCAL = ["tcp://127.0.0.1:5601", "tcp://127.0.0.1:5602", "tcp://localhost:5603"]


def test_auto_shares_the_cores_among_local_peers() -> None:
    cores = os.cpu_count() or 1
    assert local_peer_count([*LOCAL, "tcp://10.1.2.3:5604"]) == 3
    assert choose_threads("auto", LOCAL) == max(1, cores // 3)
    assert choose_threads("auto", ["tcp://10.1.2.3:5601"]) == cores
    assert choose_threads(4, LOCAL) == 4 and choose_threads("2", LOCAL) == 2


def test_policy_is_applied_before_torch_and_torch_obeys_it() -> None:
    code = (
        "import os, json, sys; os.environ.pop('OMP_WAIT_POLICY', None)\n"
        "from secure_split.cli.threads import apply_thread_policy\n"
        "apply_thread_policy(1)\n"
        "import torch\n"
        "print(json.dumps([torch.get_num_threads(), os.environ['OMP_WAIT_POLICY']]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [1, "PASSIVE"]


def test_applying_after_torch_is_imported_is_refused() -> None:
    code = (
        "import torch\n"
        "from secure_split.cli.threads import apply_thread_policy\n"
        "try:\n    apply_thread_policy(1)\nexcept RuntimeError:\n    print('refused')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "refused"
