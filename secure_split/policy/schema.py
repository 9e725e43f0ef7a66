"""Read a policy file: safe YAML, a strict schema, cross-checks; every problem reported at once.

`load_policy(path)` reads the file with `secure_split.yamlfile.read_yaml` (SafeLoader, line
numbers), validates it with pydantic models that forbid unknown keys and coercions, then checks
what a schema cannot: references to parties, kind and edge names, contradictions (a validity
window that ends before it starts, two parties with one fingerprint, tensor constraints on kinds
that carry no tensor, CKKS parameters below 128-bit security). Any problem raises `ConfigError`
listing all of them with file, key and line.

What is *valid* but unsafe (an allow rule with kind `*`, a rule that names labels as a kind,
weights to a non-owner) loads, so that `policy check` can report it as a violation (exit 1);
`check_policy` finds those and `check_startup` refuses to start on them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from secure_split.canonical import digest_of
from secure_split.config import NAME_RE
from secure_split.crypto.ckks_params import (
    DEFAULT_COEFF_MOD_BIT_SIZES,
    DEFAULT_POLY_MODULUS_DEGREE,
    DEFAULT_SCALE_BITS,
    parameter_problems,
)
from secure_split.errors import ConfigError, ConfigProblem
from secure_split.policy.kinds import (
    DTYPES,
    KIND_GROUPS,
    KIND_SET,
    MAX_NDIM,
    NO_TENSOR_KINDS,
    WILDCARD,
    expand_kinds,
)
from secure_split.policy.model import (
    RULE_DEFAULT_DENY,
    RULE_UNKNOWN_KIND,
    RULE_UNKNOWN_PARTY,
    RULE_VALIDITY,
    Assets,
    CkksRequirement,
    Constraints,
    EdgeRequirement,
    EgressGuards,
    Party,
    Policy,
    Requirements,
    Rule,
)
from secure_split.yamlfile import KeyPath, YamlDocument, read_yaml

LANGUAGE_VERSION = 1
POLICY_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._\-]{0,63}$")
RULE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@>+\-]{0,127}$")
EDGE_RE = re.compile(r"^([a-z][a-z0-9_]{0,62})->([a-z][a-z0-9_]{0,62})$")
FINGERPRINT_RE = re.compile(r"^sha256:[0-9a-f]{32}$")
RESERVED_RULE_IDS = frozenset({RULE_DEFAULT_DENY, RULE_VALIDITY, RULE_UNKNOWN_PARTY, RULE_UNKNOWN_KIND})
RESERVED_RULE_PREFIXES = ("asset:", "guard:")
LABEL_DEFENCES = ("max_norm", "marvell")

ASSET_KIND_NAMES: dict[str, str] = {
    "features": "features",
    "raw_features": "features",
    "raw": "features",
    "labels": "labels",
    "weights": "weights",
    "segment_weights": "weights",
    "model_weights": "weights",
    "ckks_secret_key": "ckks_secret_key",
    "secret_key": "ckks_secret_key",
}
"""Names someone might write in `kinds:` to move an asset. They load (so `policy check` can say
why this is a violation) but match no message: assets have no message kind."""

"""Largest total coefficient-modulus bit count for 128-bit classical security, per ring degree N
(HomomorphicEncryption.org security standard, as used by SEAL and TenSEAL)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class AssetsSpec(_Strict):
    """`parties.NAME.assets`: what this party owns."""

    features: bool = False
    labels: bool = False
    weights: list[str] = Field(default_factory=list)
    ckks_secret_key: bool = False


class PartySpec(_Strict):
    """`parties.NAME`: a signatory."""

    fingerprint: str
    description: str | None = None
    assets: AssetsSpec = Field(default_factory=AssetsSpec)
    aggregates: list[str] = Field(default_factory=list)
    relays: list[str] = Field(default_factory=list)


class DenySpec(_Strict):
    """An entry of `deny:`. Selectors are validated by hand for clearer messages."""

    id: str
    description: str | None = None
    from_: Any = Field(alias="from")
    to: Any
    kinds: Any
    edges: Any = None


class AllowSpec(DenySpec):
    """An entry of `allow:`: selectors plus constraints."""

    max_bytes: int | None = Field(default=None, ge=1)
    min_batch: int | None = Field(default=None, ge=1)
    dtype: Any = None
    shape: Any = None
    compression: bool = False
    max_distance_correlation: float | None = Field(default=None, ge=0.0, le=1.0)


class ValidSpec(_Strict):
    """`valid:`: the validity window."""

    not_before: Any = None
    not_after: Any = None


class EdgeRequirementSpec(_Strict):
    """`require.edges.EDGE`: minimum protections on an edge."""

    nopeek_alpha: float | None = Field(default=None, ge=0.0)
    activation_noise_std: float | None = Field(default=None, ge=0.0)
    gradient_noise_std: float | None = Field(default=None, ge=0.0)
    gradient_clip_norm: float | None = Field(default=None, gt=0.0)
    label_defence: Any = None


class CkksSpec(_Strict):
    """`require.ckks`: the CKKS parameters of every context (N is also the least one accepted)."""

    min_poly_modulus_degree: Literal[4096, 8192, 16384, 32768] = 4096  # = DEFAULT_POLY_MODULUS_DEGREE
    coeff_mod_bit_sizes: list[int] | None = None
    scale_bits: int = DEFAULT_SCALE_BITS
    security_bits: Literal[128] = 128


class RequireSpec(_Strict):
    """`require:`: protections a deployment must configure."""

    edges: dict[str, EdgeRequirementSpec] = Field(default_factory=dict)
    he_merge: Any = None
    ckks: CkksSpec | None = None
    public_architecture: Any = None


class EgressSpec(_Strict):
    """`egress:`: leakage guards at the data owner's egress."""

    refuse_raw_shape: bool = True
    refuse_raw_rows: bool = True
    row_tolerance: float = Field(default=1e-3, ge=0.0, le=0.5)


class PolicySpec(_Strict):
    """The whole policy file."""

    language: Literal[1] = 1
    name: str
    version: int = Field(ge=1)
    description: str | None = None
    valid: ValidSpec | None = None
    parties: dict[str, PartySpec] = Field(min_length=1)
    allow: list[AllowSpec] = Field(default_factory=list)
    deny: list[DenySpec] = Field(default_factory=list)
    require: RequireSpec = Field(default_factory=RequireSpec)
    egress: EgressSpec = Field(default_factory=EgressSpec)


# ---- helpers -------------------------------------------------------------------------------


def _jsonable(obj: Any) -> Any:
    """The parsed mapping with dates as ISO strings, so it can be hashed canonically."""
    if isinstance(obj, datetime | date):
        return obj.isoformat()
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


def _parse_time(value: Any, *, end_of_day: bool) -> tuple[datetime | None, str | None]:
    """A timezone-aware UTC time from a YAML timestamp, date or ISO string; or an error message."""
    if value is None:
        return None, None
    if isinstance(value, str):
        text = value.strip()
        try:
            value = date.fromisoformat(text) if len(text) == 10 else datetime.fromisoformat(text)
        except ValueError:
            return None, "expected a date (2026-12-31) or a timestamp with timezone (2026-12-31T23:59:59Z)"
    if isinstance(value, datetime):
        if value.tzinfo is None:
            return None, "give the timestamp a timezone, e.g. 2026-12-31T23:59:59Z"
        return value.astimezone(UTC), None
    if isinstance(value, date):
        start = datetime.combine(value, time(0, 0), tzinfo=UTC)
        return (start + timedelta(days=1) - timedelta(microseconds=1) if end_of_day else start), None
    return None, "expected a date (2026-12-31) or a timestamp with timezone (2026-12-31T23:59:59Z)"


def _names(
    value: Any, key: KeyPath, what: str, doc: YamlDocument, problems: list[ConfigProblem]
) -> list[str]:
    """A string or non-empty list of strings, else a problem."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    if isinstance(value, list) and not value:
        problems.append(doc.problem(key, f"an empty list matches nothing; name at least one {what} or '*'"))
    else:
        problems.append(doc.problem(key, f"expected a {what} name, a list of them, or '*'"))
    return []


def _party_selector(
    value: Any, key: KeyPath, parties: Mapping[str, Any], doc: YamlDocument, problems: list[ConfigProblem]
) -> frozenset[str] | None:
    names = _names(value, key, "party", doc, problems)
    if WILDCARD in names:
        return None
    for n in names:
        if n not in parties:
            problems.append(doc.problem(key, f"'{n}' is not one of the parties {sorted(parties)}"))
    return frozenset(names)


RETIRED_KINDS = frozenset({"heartbeat", "metrics"})
"""Kinds of protocol version 1 that no peer sends any more: a policy signed earlier may still name
them (it stays valid and keeps its hash); a rule's mention of one matches no message."""


def _kinds(value: Any, key: KeyPath, doc: YamlDocument, problems: list[ConfigProblem]) -> tuple[str, ...]:
    names = _names(value, key, "message kind", doc, problems)
    for n in names:
        if n != WILDCARD and n not in KIND_SET and n not in KIND_GROUPS and n not in ASSET_KIND_NAMES \
                and n not in RETIRED_KINDS:
            problems.append(
                doc.problem(
                    key,
                    f"'{n}' is not a message kind; use one of {', '.join(sorted(KIND_SET))}, "
                    f"a group ({', '.join(sorted(KIND_GROUPS))}) or '*'",
                )
            )
    return tuple(names)


def _edges(
    value: Any, key: KeyPath, doc: YamlDocument, problems: list[ConfigProblem]
) -> frozenset[str] | None:
    if value is None:
        return None
    names = _names(value, key, "edge", doc, problems)
    if WILDCARD in names:
        return None
    for n in names:
        m = EDGE_RE.match(n)
        if not m:
            problems.append(doc.problem(key, f"'{n}' is not an edge id; write FROM->TO with segment names"))
        elif m.group(1) == m.group(2):
            problems.append(doc.problem(key, f"'{n}' joins a segment to itself"))
    return frozenset(names)


def _dtypes(
    value: Any, key: KeyPath, doc: YamlDocument, problems: list[ConfigProblem]
) -> frozenset[str] | None:
    if value is None:
        return None
    names = _names(value, key, "dtype", doc, problems)
    for n in names:
        if n not in DTYPES:
            problems.append(doc.problem(key, f"'{n}' is not a wire dtype; use one of {', '.join(DTYPES)}"))
    return frozenset(names)


def _shape(
    value: Any, key: KeyPath, doc: YamlDocument, problems: list[ConfigProblem]
) -> tuple[int | None, ...] | None:
    if value is None:
        return None
    msg = f"expected a list of 1 to {MAX_NDIM} sizes (positive integers, or null / '*' for any size)"
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_NDIM:
        problems.append(doc.problem(key, msg))
        return None
    out: list[int | None] = []
    for d in value:
        if d is None or d == WILDCARD:
            out.append(None)
        elif isinstance(d, int) and not isinstance(d, bool) and d >= 1:
            out.append(d)
        else:
            problems.append(doc.problem(key, msg))
            return None
    return tuple(out)


def _rule_id(
    rid: str, key: KeyPath, seen: dict[str, KeyPath], doc: YamlDocument, problems: list[ConfigProblem]
) -> None:
    if not RULE_ID_RE.match(rid):
        problems.append(doc.problem(key, "rule ids are letters, digits and _ . : @ > + - (at most 128)"))
    if rid in RESERVED_RULE_IDS or rid.startswith(RESERVED_RULE_PREFIXES):
        problems.append(doc.problem(key, f"'{rid}' is reserved for decisions the engine makes itself"))
    if rid in seen:
        other = ".".join(str(k) for k in seen[rid])
        problems.append(
            doc.problem(key, f"rule id '{rid}' is used twice (also at {other}); ids must be unique")
        )
    seen[rid] = key


def _build_rule(
    spec: DenySpec,
    index: int,
    section: Literal["allow", "deny"],
    parties: Mapping[str, Any],
    seen: dict[str, KeyPath],
    doc: YamlDocument,
    problems: list[ConfigProblem],
) -> Rule:
    base: KeyPath = (section, index)
    _rule_id(spec.id, (*base, "id"), seen, doc, problems)
    senders = _party_selector(spec.from_, (*base, "from"), parties, doc, problems)
    receivers = _party_selector(spec.to, (*base, "to"), parties, doc, problems)
    if senders is not None and receivers is not None and len(senders) == 1 and senders == receivers:
        problems.append(
            doc.problem(base, f"'{next(iter(senders))}' sending to itself never crosses the wire")
        )
    kind_names = _kinds(spec.kinds, (*base, "kinds"), doc, problems)
    edges = _edges(spec.edges, (*base, "edges"), doc, problems)
    kinds = expand_kinds(kind_names)
    constraints = Constraints()
    if isinstance(spec, AllowSpec):
        constraints = Constraints(
            max_bytes=spec.max_bytes,
            min_batch=spec.min_batch,
            dtypes=_dtypes(spec.dtype, (*base, "dtype"), doc, problems),
            shape=_shape(spec.shape, (*base, "shape"), doc, problems),
            compression=spec.compression,
            max_distance_correlation=spec.max_distance_correlation,
        )
        tensor_keys = [
            k
            for k, v in (
                ("dtype", constraints.dtypes),
                ("shape", constraints.shape),
                ("min_batch", constraints.min_batch),
                ("max_distance_correlation", constraints.max_distance_correlation),
            )
            if v is not None
        ]
        no_tensor = sorted(kinds & NO_TENSOR_KINDS)
        if tensor_keys and no_tensor:
            problems.append(
                doc.problem(
                    (*base, tensor_keys[0]),
                    f"{', '.join(tensor_keys)} can never hold for kind{'s' if len(no_tensor) > 1 else ''} "
                    f"{', '.join(no_tensor)} (no tensor); put tensor kinds in a rule of their own",
                )
            )
    return Rule(
        id=spec.id,
        action=section,
        senders=senders,
        receivers=receivers,
        kinds=kinds,
        kind_names=kind_names,
        edges=edges,
        constraints=constraints,
        description=spec.description,
        line=doc.line_of(base),
    )


def _pydantic_problems(doc: YamlDocument, exc: ValidationError) -> list[ConfigProblem]:
    out = []
    for err in exc.errors():
        loc: KeyPath = tuple(x for x in err["loc"] if isinstance(x, str | int) and x != "[key]")
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling"
        elif err["type"] == "missing":
            msg = "required key is missing"
        out.append(doc.problem(loc, msg))
    return out


def _requirements(spec: RequireSpec, doc: YamlDocument, problems: list[ConfigProblem]) -> Requirements:
    edges: list[EdgeRequirement] = []
    for name, req in spec.edges.items():
        key: KeyPath = ("require", "edges", name)
        if name != WILDCARD and not EDGE_RE.match(name):
            problems.append(doc.problem(key, f"'{name}' is not an edge id; write FROM->TO or '*'"))
        defences: frozenset[str] | None = None
        if req.label_defence is not None:
            names = _names(req.label_defence, (*key, "label_defence"), "label defence", doc, problems)
            for n in names:
                if n not in LABEL_DEFENCES:
                    problems.append(
                        doc.problem(
                            (*key, "label_defence"), f"'{n}' is not one of {', '.join(LABEL_DEFENCES)}"
                        )
                    )
            defences = frozenset(names)
        edges.append(
            EdgeRequirement(
                edge=name,
                nopeek_alpha=req.nopeek_alpha,
                activation_noise_std=req.activation_noise_std,
                gradient_noise_std=req.gradient_noise_std,
                gradient_clip_norm=req.gradient_clip_norm,
                label_defence=defences,
                line=doc.line_of(key),
            )
        )
    he_merge = _segment_names(spec.he_merge, "he_merge", doc, problems)
    public_architecture = _segment_names(spec.public_architecture, "public_architecture", doc, problems)
    ckks = CkksRequirement()
    if spec.ckks is not None:
        degree: int = spec.ckks.min_poly_modulus_degree
        bits = spec.ckks.coeff_mod_bit_sizes
        if bits is None:
            bits = list(DEFAULT_COEFF_MOD_BIT_SIZES) if degree == DEFAULT_POLY_MODULUS_DEGREE else [60, 40, 40, 60]
        keys = {"poly_modulus_degree": "min_poly_modulus_degree", "global_scale_bits": "scale_bits"}
        found = parameter_problems(degree, bits, spec.ckks.scale_bits)
        for field_name, message in found:
            key = ("require", "ckks", keys.get(field_name, field_name))
            problems.append(doc.problem(key, message))
        if not found:
            ckks = CkksRequirement(degree, tuple(bits), spec.ckks.security_bits, spec.ckks.scale_bits)
    return Requirements(edges=tuple(edges), he_merge=he_merge, ckks=ckks, ckks_given=spec.ckks is not None,
                        public_architecture=public_architecture)


def _segment_names(
    value: Any, key: str, doc: YamlDocument, problems: list[ConfigProblem]
) -> frozenset[str] | None:
    """`require.KEY`: segment names, or '*' (None: every segment); empty when not given."""
    if value is None:
        return frozenset()
    names = _names(value, ("require", key), "segment", doc, problems)
    if WILDCARD in names:
        return None
    for n in names:
        if not NAME_RE.match(n):
            problems.append(doc.problem(("require", key), f"'{n}' is not a segment name"))
    return frozenset(names)


def policy_from_document(doc: YamlDocument) -> Policy:
    """Validate a parsed policy document and build the Policy.

    Raises:
        ConfigError: every problem found, with file, key and line.
    """
    try:
        spec = PolicySpec.model_validate(doc.data)
    except ValidationError as exc:
        raise ConfigError(_pydantic_problems(doc, exc)) from None
    problems: list[ConfigProblem] = []
    if not POLICY_NAME_RE.match(spec.name):
        problems.append(doc.problem(("name",), "policy names are lowercase letters, digits and . _ - (≤ 64)"))

    parties: dict[str, Party] = {}
    fingerprints: dict[str, str] = {}
    for pname, pspec in spec.parties.items():
        key: KeyPath = ("parties", pname)
        if not NAME_RE.match(pname):
            problems.append(doc.problem(key, "party names are peer names: lowercase letters, digits and _"))
        if not FINGERPRINT_RE.match(pspec.fingerprint):
            problems.append(
                doc.problem(
                    (*key, "fingerprint"),
                    "expected sha256: and 32 hex digits, as `secure-split keys show` prints (NAME.pub)",
                )
            )
        elif pspec.fingerprint in fingerprints:
            other = fingerprints[pspec.fingerprint]
            line = doc.line_of(("parties", other, "fingerprint"))
            problems.append(
                doc.problem(
                    (*key, "fingerprint"),
                    f"the fingerprint for {pname} in {doc.path.name} is {other}'s (same fingerprint as party "
                    f"'{other}'{f', line {line}' if line else ''}); each party has its own key: copy {pname}'s "
                    f"from `secure-split keys show {pname}.pub`",
                )
            )
        fingerprints.setdefault(pspec.fingerprint, pname)
        for wkey, names in (
            ((*key, "assets", "weights"), pspec.assets.weights),
            ((*key, "aggregates"), pspec.aggregates),
            ((*key, "relays"), pspec.relays),
        ):
            for w in names:
                if not NAME_RE.match(w):
                    problems.append(doc.problem(wkey, f"'{w}' is not a segment or model name"))
        both = sorted(set(pspec.assets.weights) & set(pspec.aggregates))
        if both:
            problems.append(
                doc.problem((*key, "aggregates"), f"{both} are owned by this party already (assets.weights)")
            )
        a = pspec.assets
        assets = Assets(a.features, a.labels, tuple(dict.fromkeys(a.weights)), a.ckks_secret_key)
        both = sorted(set(pspec.assets.weights) & set(pspec.relays))
        if both:
            problems.append(
                doc.problem((*key, "relays"), f"{both} are owned by this party already (assets.weights)")
            )
        parties[pname] = Party(
            pname, pspec.fingerprint, assets, tuple(dict.fromkeys(pspec.aggregates)), pspec.description,
            relays=tuple(dict.fromkeys(pspec.relays)),
        )

    seen: dict[str, KeyPath] = {}
    allow = tuple(
        _build_rule(r, i, "allow", spec.parties, seen, doc, problems) for i, r in enumerate(spec.allow)
    )
    deny = tuple(
        _build_rule(r, i, "deny", spec.parties, seen, doc, problems) for i, r in enumerate(spec.deny)
    )

    not_before = not_after = None
    if spec.valid is not None:
        not_before, err = _parse_time(spec.valid.not_before, end_of_day=False)
        if err:
            problems.append(doc.problem(("valid", "not_before"), err))
        not_after, err = _parse_time(spec.valid.not_after, end_of_day=True)
        if err:
            problems.append(doc.problem(("valid", "not_after"), err))
        if not_before is not None and not_after is not None and not_before >= not_after:
            problems.append(doc.problem(("valid",), "not_before must come before not_after"))

    requirements = _requirements(spec.require, doc, problems)
    raw = _jsonable(doc.data)
    try:
        policy_hash = digest_of(raw)
    except (TypeError, ValueError, UnicodeError) as exc:
        problems.append(doc.problem((), f"cannot be hashed canonically: {exc}"))
        policy_hash = ""
    if problems:
        raise ConfigError(problems)
    eg = spec.egress
    return Policy(
        name=spec.name,
        version=spec.version,
        path=doc.path,
        hash=policy_hash,
        raw=MappingProxyType(raw),
        parties=MappingProxyType(parties),
        allow=allow,
        deny=deny,
        not_before=not_before,
        not_after=not_after,
        requirements=requirements,
        egress=EgressGuards(eg.refuse_raw_shape, eg.refuse_raw_rows, eg.row_tolerance),
        description=spec.description,
        lines=MappingProxyType(dict(doc.lines)),
    )


def policy_from_mapping(data: Mapping[str, Any], *, path: str | Path = "<policy>") -> Policy:
    """Build a Policy from an already parsed mapping (tests, generated policies).

    Args:
        data: the mapping, as `yaml.safe_load` would return it.
        path: the file name to show in problems.

    Raises:
        ConfigError: every problem found (no line numbers: there is no file).
    """
    if not isinstance(data, Mapping):
        raise ConfigError(ConfigProblem(str(path), "-", "a policy must be a mapping of keys to values"))
    return policy_from_document(YamlDocument(Path(path), dict(data), {}))


def load_policy(path: str | Path) -> Policy:
    """Load and validate a policy file.

    Args:
        path: the YAML file.

    Returns:
        The Policy; `Policy.hash` is what every party signs and the handshake compares.

    Raises:
        ConfigError: the file cannot be read, is not YAML, or is invalid; lists every problem
            with file and line.
    """
    # A signed policy should read as what it means: no anchors or aliases at all.
    doc = read_yaml(path, "policy", aliases=False)
    return dataclasses.replace(policy_from_document(doc), path=doc.path.resolve())
