"""Bad input from a peer gets a refusal, an audit entry and an answer; the receiver keeps serving.

The rogue here holds a valid deployment key (the owner's): the CURVE allowlist admits it, so what
it sends reaches the gate, attributed to 'owner'. It cannot know the session the real owner
established (that travels encrypted), so nothing it sends can be accepted.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from secure_split.config import load_deployment
from secure_split.crypto.keys import load_identity
from secure_split.errors import CodecError, RemoteProtocolError, ReplayError
from secure_split.protocol import Binding, Kind, Message, WireTensor, encode
from secure_split.transport import Transport, TransportPeer
from tests.integration.helpers import (
    Deploy,
    clone_deployment,
    close_gates,
    events,
    gate_pair,
    run_cli_many,
    start_peers,
    wait_for,
    wait_peers,
)

pytestmark = pytest.mark.integration

EDGE = "bottom->top"


def _activation(batch: int = 8) -> WireTensor:
    return WireTensor("float32", (batch, 16), bytes(4 * batch * 16))


def test_gate_refuses_garbage_replays_and_spoofs_and_keeps_serving(vanilla_template: Deploy, tmp_path: Path) -> None:
    d = clone_deployment(vanilla_template, tmp_path / "d")
    dep = load_deployment(d.deployment)
    sides = gate_pair(d, tmp_path / "audit")
    owner, holder = sides["owner"], sides["label_holder"]
    try:
        first = owner.gate.send("label_holder", Kind.ACTIVATION, step=1, edge=EDGE, meta={"phase": "train"},
                                tensors=(_activation(),))
        assert holder.receive().kind is Kind.ACTIVATION

        # 1. Bytes that are not a secure_split message at all.
        owner.transport.send("label_holder", [b"\x00garbage, not a frame"])
        with pytest.raises(CodecError):
            holder.receive()
        # 2. The same (authentic) message again: a replay.
        owner.transport.send("label_holder", encode(first))
        with pytest.raises(ReplayError, match="replay or duplicate"):
            holder.receive()
        # 3. A message that claims another sender than the key it arrived under.
        spoof = Message(Kind.BARRIER, Binding(dep.hash, first.binding.session, 0, 2, "label_holder", "owner"),
                        meta={"epoch": 0})
        owner.transport.send("label_holder", encode(spoof))
        with pytest.raises(RemoteProtocolError, match="from authenticated peer 'owner'"):
            holder.receive()
        # 4. A header announcing more payload than max_message_bytes: refused before allocating it.
        big = Message(Kind.ACTIVATION, Binding(dep.hash, first.binding.session, 1, 2, "owner", "label_holder"),
                      edge=EDGE, meta={"phase": "train"}, tensors=(_activation(64),))
        frames = encode(big)
        holder.gate.max_message_bytes = 1024  # the bound this receiver enforces
        owner.transport.send("label_holder", frames)
        with pytest.raises(CodecError):
            holder.receive()
        holder.gate.max_message_bytes = dep.spec.limits.max_message_bytes

        # Still serving: the owner's next genuine message (seq 2 of the session) is accepted.
        owner.gate.send("label_holder", Kind.ACTIVATION, step=2, edge=EDGE, meta={"phase": "train"},
                        tensors=(_activation(),))
        ok = holder.receive()
        assert ok.kind is Kind.ACTIVATION and ok.binding.seq == 2
        # Every refusal was answered (the bad input's sender is told), the replay and garbage too.
        codes = []
        while (msg := owner.gate.receive(0.5)) is not None:
            codes.append(msg.meta["code"])
        assert codes == ["bad_frame", "protocol", "spoofed", "bad_frame"]
        assert holder.gate.stats.refused_in == 4
    finally:
        close_gates(sides)

    refused = events(holder.entries(), "refused")
    assert [e["data"]["error"] for e in refused] == ["CodecError", "ReplayError", "RemoteProtocolError", "CodecError"]
    assert all(e["data"]["counterparty"] == "owner" and e["data"]["direction"] == "receive" for e in refused)
    activations = [e["data"]["seq"] for e in events(holder.entries(), "message_received")
                   if e["data"]["kind"] == "activation"]
    assert activations == [1, 2], "only the two genuine activations were accepted"


def test_rogue_key_holder_during_a_run_is_refused_and_training_completes(
    vanilla_template: Deploy, tmp_path: Path,
) -> None:
    d = clone_deployment(vanilla_template, tmp_path / "d", epochs=1, max_steps=20)
    dep = load_deployment(d.deployment)
    procs = start_peers(d)
    rogue = None
    try:
        assert wait_for(lambda: bool(events(d.audit("label_holder"), "peer_joined")), 120), "handshake never completed"
        ident = load_identity(d.workdir / "keys" / "owner.key")
        target = dep.spec.peers["label_holder"]
        from secure_split.scenarios import free_ports

        rogue = Transport("owner", f"tcp://127.0.0.1:{free_ports(1)[0]}", ident.transport_secret_z85,
                          ident.transport_public_z85,
                          {"label_holder": TransportPeer("label_holder", target.endpoint, target.transport_key)},
                          max_message_bytes=1 << 20, linger_ms=0, send_timeout_s=5.0)
        rogue.start()
        # Garbage; a message bound to a session the rogue made up (as a replay from another session
        # would be); a message claiming to come from the label holder itself.
        rogue.send("label_holder", [b"garbage garbage garbage"])
        other_session = Binding(dep.hash, os.urandom(16), 0, 5, "owner", "label_holder")
        rogue.send("label_holder", encode(Message(Kind.ERROR, other_session, meta={"reason": "r", "code": "r"})))
        spoof = Binding(dep.hash, os.urandom(16), 0, 1, "label_holder", "owner")
        rogue.send("label_holder", encode(Message(Kind.BARRIER, spoof, meta={"epoch": 0})))
        assert wait_for(lambda: len(events(d.audit("label_holder"), "refused")) >= 3, 60)
    finally:
        if rogue is not None:
            rogue.close()
        codes = wait_peers(procs, timeout=180)

    for name, p in procs.items():
        assert codes[name] == 0, p.stderr
        assert p.result_json()["status"] == "ok"
    holder = procs["label_holder"].result_json()
    assert holder["epochs_done"] == 1 and "accuracy/labels" in holder["metrics"]["final"]
    assert holder["refused"] >= 3

    refused = events(d.audit("label_holder"), "refused")
    assert {e["data"]["error"] for e in refused} >= {"CodecError", "ReplayError", "RemoteProtocolError"}
    assert all(e["data"]["counterparty"] == "owner" for e in refused)
    # The real owner was told about frames sent under its key; it notes them and carries on.
    notices = [e["data"]["reason"] for e in events(d.audit("owner"), "error")]
    assert any("not sent by us (bad_frame)" in r for r in notices), notices
    assert any("not sent by us (spoofed)" in r for r in notices), notices
    for name in ("owner", "label_holder"):
        assert events(d.audit(name), "run_end")[-1]["data"]["status"] == "ok"

    (verify,) = run_cli_many([["audit", "verify", str(d.audit_dir), "--deployment", str(d.deployment)]])
    assert verify.returncode == 0, verify.stdout + verify.stderr
