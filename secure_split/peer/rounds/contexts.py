"""CKKS context distribution as a sans-IO round.

One key holder creates a CKKS context with exactly the policy's parameters. It sends the public
context (which cannot decrypt) to the peers that only add ciphertexts (a merge holder, a
horizontal coordinator), and the secret context, sealed to each receiver's transport key (NaCl
box), to the other peers that must decrypt (the other owners). Where the deployment relays
(`handoff: relay`), the coordinator carries the sealed secrets it cannot open: the key holder
sends them to it with meta `to`, it forwards them with meta `from`.

Every receiver checks who sent what: a public context must come from the key holder and must
not hold a secret key; a secret context must open under the key holder's transport key. The round
is done at a peer once it holds the context it needs (a relay is done at once: it forwards as
the sealed secrets arrive).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from secure_split.crypto.he import CkksContext, CkksParams, KeyHolderContext, PublicContext
from secure_split.crypto.keys import Identity
from secure_split.crypto.seal import open_from, seal_to
from secure_split.errors import CryptoError, RemoteProtocolError
from secure_split.peer.effects import Effect, Send
from secure_split.protocol import Kind, Message

__all__ = ["ContextPlan", "ContextRound"]


@dataclass(frozen=True)
class ContextPlan:
    """Who gets which context for one use of CKKS.

    Attributes:
        scope: the merge segment, or "" for the weight averaging of a horizontal deployment
            (sent as meta `segment` when not empty).
        key_holder: the peer that creates the context and keeps its secret key.
        public_to: peers that receive the public context.
        secret_to: peers that receive the secret context, sealed to them.
        relay: the peer that carries the sealed secrets, or None to send them directly.
    """

    scope: str
    key_holder: str
    public_to: tuple[str, ...]
    secret_to: tuple[str, ...]
    relay: str | None = None

    def role(self, me: str) -> str:
        """'key_holder', 'public', 'secret', 'relay' or 'none'."""
        if me == self.key_holder:
            return "key_holder"
        if me in self.secret_to:
            return "secret"
        if me in self.public_to:
            return "public"
        if me == self.relay:
            return "relay"
        return "none"


class ContextRound:
    """One peer's part in distributing one CKKS context.

    Args:
        me: this peer.
        plan: who gets what.
        params: the policy's CKKS parameters (contexts with others are refused).
        identity: this peer's keys (to seal and open the secret context).
        transport_keys: every peer's public transport key (Z85), from the deployment.
        max_bytes: bound on one context message.
    """

    def __init__(self, me: str, plan: ContextPlan, *, params: CkksParams, identity: Identity,
                 transport_keys: Mapping[str, str], max_bytes: int) -> None:
        self.me = me
        self.plan = plan
        self.params = params
        self._identity = identity
        self._keys = dict(transport_keys)
        self._max_bytes = max_bytes
        self.context: CkksContext | None = None
        self._public: bytes | None = None
        self._secret: bytes | None = None
        self._replace = False  # the key holder restarted: its new context replaces ours
        self._sealed_for: dict[str, bytes] = {}  # relay: receiver -> sealed secret, to send again

    @property
    def done(self) -> bool:
        """This peer holds what it needs (a relay and a bystander need nothing)."""
        return self.context is not None or self.plan.role(self.me) in ("relay", "none")

    def _meta(self, part: str, **extra: str) -> dict[str, str]:
        meta = {"part": part, **extra}
        if self.plan.scope:
            meta["segment"] = self.plan.scope
        return meta

    def start(self) -> list[Effect]:
        """The key holder creates the context and sends every part; the others send nothing."""
        if self.plan.role(self.me) != "key_holder":
            return []
        ctx = KeyHolderContext.create(self.params)
        self.context = ctx
        self._public = ctx.public_context_bytes()
        out: list[Effect] = [Send(p, Kind.HE_CONTEXT, meta=self._meta("public"), blob=self._public)
                             for p in self.plan.public_to]
        self._secret = ctx.serialize_secret()
        for p in self.plan.secret_to:
            out.extend(self.send_secret(p))
        return out

    def send_secret(self, to: str) -> list[Effect]:
        """Key holder: the sealed secret context for `to` (again, for a restarted peer)."""
        if self._secret is None:
            return []
        sealed = seal_to(self._keys[to], self._identity, self._secret)
        if self.plan.relay is not None:
            return [Send(self.plan.relay, Kind.HE_CONTEXT, meta=self._meta("secret", to=to), blob=sealed)]
        return [Send(to, Kind.HE_CONTEXT, meta=self._meta("secret"), blob=sealed)]

    def resend(self, to: str) -> list[Effect]:
        """Key holder: `to` restarted and lost its context: its part again (the same key)."""
        if to in self.plan.secret_to:
            return self.send_secret(to)
        if to in self.plan.public_to and self._public is not None:
            return [Send(to, Kind.HE_CONTEXT, meta=self._meta("public"), blob=self._public)]
        return []

    @property
    def awaiting(self) -> bool:
        """The key holder restarted and its new context has not arrived yet."""
        return self._replace

    def expect_replacement(self) -> None:
        """The key holder restarted: it brings a new key, whose context replaces ours."""
        if self.plan.role(self.me) in ("public", "secret"):
            self._replace = True

    def forward_again(self, to: str) -> list[Effect]:
        """Relay: the sealed secret context for `to` once more, if the key holder sent one."""
        sealed = self._sealed_for.get(to)
        if sealed is None:
            return []
        return [Send(to, Kind.HE_CONTEXT, meta=self._meta("secret", **{"from": self.plan.key_holder}), blob=sealed)]

    def concerns(self, msg: Message) -> bool:
        """Whether `msg` (an `he_context`) belongs to this round."""
        return str(msg.meta.get("segment", "")) == self.plan.scope

    def on_message(self, msg: Message) -> list[Effect]:
        """An `he_context` message of this round.

        Raises:
            RemoteProtocolError: from the wrong peer, the wrong part, a private context where a
                public one belongs, or bytes that do not load.
        """
        sender, part = msg.binding.sender, msg.meta.get("part")
        role, kh, plan = self.plan.role(self.me), self.plan.key_holder, self.plan
        if role == "relay" or (role == "public" and "to" in msg.meta):
            to = str(msg.meta.get("to", ""))
            if sender != kh or part != "secret" or to not in plan.secret_to:
                raise RemoteProtocolError(f"'{sender}' asked to relay a CKKS secret context to {to!r}")
            self._sealed_for[to] = bytes(msg.blob)
            return self.forward_again(to)
        if self.context is not None and not self._replace:
            raise RemoteProtocolError(f"'{sender}' sent a second CKKS context for {plan.scope or 'weight averaging'}")
        try:
            if role == "public":
                if sender != kh or part != "public":
                    raise RemoteProtocolError(self._unexpected(msg, "the public context"))
                pub = PublicContext.from_bytes(bytes(msg.blob), params=self.params, max_bytes=self._max_bytes)
                if pub.is_private():  # whoever adds ciphertexts must never be able to decrypt
                    raise RemoteProtocolError(f"'{kh}' sent a context with a secret key to '{self.me}'")
                self.context = pub
            elif role == "secret":
                via = plan.relay or kh
                origin = str(msg.meta.get("from", "")) if plan.relay else sender
                if sender != via or origin != kh or part != "secret":
                    raise RemoteProtocolError(self._unexpected(msg, "the secret context"))
                secret = open_from(self._identity, self._keys[kh], bytes(msg.blob))
                self.context = KeyHolderContext.from_secret_bytes(secret, params=self.params, max_bytes=self._max_bytes)
            else:
                raise RemoteProtocolError(self._unexpected(msg, "no context"))
        except CryptoError as exc:
            raise RemoteProtocolError(f"CKKS context from '{sender}' refused: {exc}") from None
        self._replace = False
        return []

    def _unexpected(self, msg: Message, expected: str) -> str:
        return (f"unexpected CKKS context from '{msg.binding.sender}' (part {msg.meta.get('part')!r}"
                f"{', segment ' + repr(self.plan.scope) if self.plan.scope else ''}); '{self.me}' expects "
                f"{expected} from '{self.plan.key_holder}'")


def vertical_plans(merges: Sequence[tuple[str, str, str, tuple[str, ...]]]) -> list[ContextPlan]:
    """Plans for the HE merges of a vertical deployment: (segment, holder, key holder, feeders)."""
    return [ContextPlan(seg, kh, (holder,), tuple(o for o in feeders if o not in (kh, holder)))
            for seg, holder, kh, feeders in merges]
