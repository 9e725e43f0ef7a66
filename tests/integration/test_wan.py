"""A vertical-HE deployment trains to completion across an emulated WAN (20 ms one way, 0.5 % loss).

Each peer runs in its own network namespace behind the userspace link emulator of bench/wan.py
(TUN devices: the kernels' TCP stacks see real delay and real loss). Bounded: one epoch of three
training steps plus evaluation, about 20 s on an idle two-core machine. Skipped, with the reason,
where network namespaces or TUN devices are unavailable (not root, no /dev/net/tun).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from secure_split.testing import generate_deployment
from tests.integration.helpers import cli
from tests.unit.bench.test_wan import load_wan

wan = load_wan()
UNAVAILABLE = wan.unavailable_reason()

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(UNAVAILABLE is not None, reason=f"no emulated WAN here: {UNAVAILABLE}"),
]


def test_vertical_he_trains_to_completion_over_20_ms_one_way_and_half_a_percent_loss(tmp_path: Path):
    gen = generate_deployment("vertical-he", tmp_path, epochs=1)
    data = yaml.safe_load(gen.deployment.read_text())
    data["training"]["max_steps_per_epoch"] = 3
    gen.deployment.write_text(yaml.safe_dump(data, sort_keys=False))

    out = wan.run_deployment(gen, wan.Link(delay_ms=20, loss=0.005), timeout_s=240)

    logs = {name: Path(path).read_text(errors="replace")[-2000:] for name, path in out["logs"].items()}
    assert out["exit_codes"] == {"hospital_a": 0, "hospital_b": 0, "lab": 0}, logs
    lab = out["results"]["lab"]
    assert lab["status"] == "ok"
    assert lab["epochs_done"] == 1
    assert lab["metrics"]["timing"][0]["train_steps"] == 3
    # The peers really talked through the emulator, and it really dropped packets.
    stats = out["link_stats"]
    assert stats["hospital_a>lab"]["packets"] > 0 and stats["lab>hospital_b"]["packets"] > 0
    assert sum(s["lost"] for s in stats.values()) > 0
    verify = cli("audit", "verify", str(gen.workdir / "audit"), "--deployment", str(gen.deployment))
    assert verify.returncode == 0, verify.stdout + verify.stderr
