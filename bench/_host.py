"""Host facts that benchmark result files record next to their numbers (shared by bench scripts)."""

from __future__ import annotations

import os
import platform
from typing import Any


def machine() -> dict[str, Any]:
    """CPU count and the versions of Python, torch and ZeroMQ on this host.

    torch and zmq are imported here, not at module level, so a script can set its thread policy first.
    """
    import torch
    import zmq

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "zmq": zmq.zmq_version(), "pyzmq": zmq.__version__, "platform": platform.platform()}
