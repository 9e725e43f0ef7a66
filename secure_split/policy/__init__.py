"""The policy engine: what may cross the wire, decided the same way at every peer.

Pure (no sockets, no torch): the layers above ask, this package answers.

- `load_policy(path) -> Policy` (safe YAML, strict schema, every problem at once as ConfigError).
  `Policy.hash` is what every party signs and what peers compare in the handshake.
- `Policy.decide(Flow) -> Decision`: asked by the gate on every send and every receive. Default
  deny; deny rules override allow rules; assets never leave their owner whatever the rules say.
- `required_flows(deployment)`, `check_deployment(policy, deployment)`, `check_policy(policy)`,
  `check_startup(policy, deployment)`: a deployment that needs a denied flow, lacks a required
  protection, lacks a signature or runs under an expired policy does not start.
- `sign_policy(path, identity)`, `verify_signatures(policy, deployment)`, `signature_paths(policy)`:
  signature files in `POLICY_DIR/signatures/<stem>.<peer>.sig`.
- `check_egress(policy, flow, tensor, raw)`: leakage guards at a data owner's egress.
- `policy_for_deployment(deployment, name=...)`: the tightest policy a deployment runs under.

The language itself is documented for privacy officers in docs/policy-language.md.
"""

from secure_split.policy.checks import (
    Finding,
    check_deployment,
    check_policy,
    check_startup,
)
from secure_split.policy.generate import policy_for_deployment
from secure_split.policy.guards import check_egress, distance_correlation, find_raw_row
from secure_split.policy.kinds import ASSET_CARRIERS, ASSETS, CONTROL_KINDS, HE_KINDS, KINDS, SESSION_KINDS
from secure_split.policy.model import (
    Assets,
    Constraints,
    Decision,
    Flow,
    Party,
    Policy,
    Rule,
    constraint_failure,
)
from secure_split.policy.schema import load_policy, policy_from_mapping
from secure_split.policy.signatures import (
    SignatureProblem,
    sign_policy,
    signature_path,
    signature_paths,
    signature_problems,
    signing_message,
    verify_signatures,
)
from secure_split.policy.topology import RequiredFlow, he_key_holder, psi_parties, required_flows

__all__ = [
    "ASSETS",
    "ASSET_CARRIERS",
    "CONTROL_KINDS",
    "HE_KINDS",
    "KINDS",
    "SESSION_KINDS",
    "Assets",
    "Constraints",
    "Decision",
    "Finding",
    "Flow",
    "Party",
    "Policy",
    "RequiredFlow",
    "Rule",
    "SignatureProblem",
    "check_deployment",
    "check_egress",
    "check_policy",
    "check_startup",
    "constraint_failure",
    "distance_correlation",
    "find_raw_row",
    "he_key_holder",
    "load_policy",
    "policy_for_deployment",
    "policy_from_mapping",
    "psi_parties",
    "required_flows",
    "sign_policy",
    "signature_path",
    "signature_paths",
    "signature_problems",
    "signing_message",
    "verify_signatures",
]
