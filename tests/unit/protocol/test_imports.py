"""The protocol layer is sans-IO: it imports no transport, no tensor library and no crypto."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ("zmq", "torch", "nacl", "cryptography", "tenseal", "rbcl")

PROGRAM = f"""
import sys
for name in {FORBIDDEN!r}:
    sys.modules[name] = None  # any import of these now raises ImportError
import secure_split.protocol as protocol
frames = protocol.encode(protocol.PeerSession("a", "b", "0" * 64, "p").hello())
protocol.decode(frames, max_message_bytes=1 << 16)
print("ok")
"""

CLEAN = f"""
import sys
import secure_split.protocol
loaded = sorted(n for n in {FORBIDDEN!r} if n in sys.modules)
print(",".join(loaded) or "none")
"""


def run(program: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)


def test_protocol_imports_and_works_with_transport_torch_and_crypto_blocked() -> None:
    result = run(PROGRAM)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_importing_protocol_loads_none_of_the_forbidden_libraries() -> None:
    result = run(CLEAN)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "none"
