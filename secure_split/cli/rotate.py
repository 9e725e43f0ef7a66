"""`secure-split keys rotate NAME`: a new identity for a peer, and the file edits every party signs.

A key is rotated on schedule, or because it was lost or leaked. The command:

1. writes NAME's new key files (the old pair moves to `DIR/retired/`, never overwritten);
2. edits the deployment (NAME's keys replaced; the old ones appended to `retired_keys` with the
   time, so they are refused from now on while old audit entries still verify under them) and the
   policy (NAME's fingerprint), by replacing the exact key text and nothing else, so comments and
   layout stay; writes the results as `FILE.new` (or over the files with `--in-place`, keeping
   `FILE.bak`) and prints the diff;
3. lists every party that must sign the changed policy again (all of them: its hash changed).
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from secure_split.config import Deployment, load_deployment, peer_fingerprint
from secure_split.crypto.keys import Identity, generate_identity, write_key_files
from secure_split.errors import ConfigError, ExitCode
from secure_split.policy import check_deployment, load_policy


class RotationError(Exception):
    """The files could not be edited safely; the message says what to change by hand."""


def replace_key_text(text: str, old: str, new: str) -> str:
    """Replace every occurrence of the key text `old` by `new`, quoting `new` where `old` stood bare.

    Z85 keys hold characters YAML reads as syntax (`*`, `&`, `[`, `#`, ...); hex keys do not, but
    quoting both keeps one rule. Keys never contain quotes, so a quoted occurrence stays quoted.

    Raises:
        RotationError: `old` does not occur in `text`.
    """
    if old not in text:
        raise RotationError(f"the key {old[:12]}… does not occur in the file")
    out, i = [], 0
    while (j := text.find(old, i)) >= 0:
        quoted = j > 0 and text[j - 1] in "\"'"
        out.append(text[i:j])
        out.append(new if quoted else f'"{new}"')
        i = j + len(old)
    out.append(text[i:])
    return "".join(out)


def add_retired_key(text: str, entry: dict[str, str]) -> str:
    """Append `entry` to the deployment's `retired_keys` list (creating the section at the end).

    A block-style list gets a new item in the same style; a flow-style one is rewritten as JSON.

    Raises:
        RotationError: `retired_keys` is not a list.
    """
    item = "\n".join(f"{'- ' if i == 0 else '  '}{k}: {json.dumps(v)}" for i, (k, v) in enumerate(entry.items()))
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    node = None
    if isinstance(root, yaml.MappingNode):
        node = next((v for k, v in root.value if isinstance(k, yaml.ScalarNode) and k.value == "retired_keys"), None)
    if node is None:
        sep = "" if text.endswith("\n") else "\n"
        block = "\n".join("  " + line for line in item.splitlines())
        return f"{text}{sep}# Keys no peer may use any more (secure-split keys rotate).\nretired_keys:\n{block}\n"
    if not isinstance(node, yaml.SequenceNode):
        raise RotationError("retired_keys is not a list")
    if node.flow_style or not node.value:
        current = yaml.safe_load(text).get("retired_keys") or []
        flow = json.dumps([*current, entry])
        start, end = node.start_mark.index, node.end_mark.index
        return text[:start] + flow + text[end:]
    indent = " " * node.start_mark.column
    lines = "\n".join(indent + line for line in item.splitlines())
    end = node.end_mark.index
    head = text[:end] if text[:end].endswith("\n") else text[:end] + "\n"
    return head + lines + "\n" + text[end:]


@dataclass(frozen=True)
class Rotation:
    """What a rotation produced (nothing is written to the deployment or policy by building it).

    Attributes:
        identity: the peer's new identity.
        deployment_text, policy_text: the edited files' text.
        retired: the `retired_keys` entry added.
        parties: every party that must sign the edited policy.
    """

    identity: Identity
    deployment_text: str
    policy_text: str
    retired: dict[str, str]
    parties: list[str]


def plan_rotation(deployment: Deployment, name: str, *, reason: str, now: datetime | None = None,
                  identity: Identity | None = None) -> Rotation:
    """Build the new identity and the edited deployment and policy texts, and check them.

    Raises:
        RotationError: `name` is not a peer, or the edited files do not load to what was meant.
        ConfigError: the policy cannot be read.
    """
    peer = deployment.spec.peers.get(name)
    if peer is None:
        raise RotationError(f"'{name}' is not a peer of {deployment.path} (peers: {sorted(deployment.spec.peers)})")
    policy = load_policy(deployment.policy_path)
    new = identity or generate_identity(name)
    when = (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    retired = {"peer": name, "sign_key": peer.sign_key, "transport_key": peer.transport_key,
               "retired_at": when.isoformat().replace("+00:00", "Z"), "reason": reason}
    dep_text = deployment.path.read_text(encoding="utf-8")
    dep_text = replace_key_text(dep_text, peer.sign_key, new.sign_key_hex)
    dep_text = replace_key_text(dep_text, peer.transport_key, new.transport_public_z85)
    dep_text = add_retired_key(dep_text, retired)
    old_fp = peer_fingerprint(peer.sign_key, peer.transport_key)
    pol_text = policy.path.read_text(encoding="utf-8")
    if old_fp in pol_text:
        pol_text = pol_text.replace(old_fp, new.public.fingerprint)
    rotation = Rotation(new, dep_text, pol_text, retired, sorted(policy.parties))
    _check(deployment, rotation)
    return rotation


def _check(deployment: Deployment, rotation: Rotation) -> None:
    """Load the edited texts (from temporary files beside the originals) and compare with the intent."""
    name = rotation.identity.name
    dep_tmp = deployment.path.with_name(f".{deployment.path.name}.rotate-check")
    pol_tmp = deployment.policy_path.with_name(f".{deployment.policy_path.name}.rotate-check")
    try:
        dep_tmp.write_text(rotation.deployment_text, encoding="utf-8")
        pol_tmp.write_text(rotation.policy_text, encoding="utf-8")
        try:
            edited = load_deployment(dep_tmp)
            policy = load_policy(pol_tmp)
        except ConfigError as exc:
            raise RotationError(f"the edited files do not load: {exc}") from None
        expected: dict[str, Any] = json.loads(json.dumps(deployment.raw, default=str))
        expected["peers"][name]["sign_key"] = rotation.identity.sign_key_hex
        expected["peers"][name]["transport_key"] = rotation.identity.transport_public_z85
        expected["retired_keys"] = [*expected.get("retired_keys", []), rotation.retired]
        if json.loads(json.dumps(edited.raw, default=str)) != expected:
            raise RotationError("the edited deployment does not read back as intended")
        party = policy.parties.get(name)
        if party is not None and party.fingerprint != rotation.identity.public.fingerprint:
            raise RotationError(f"the policy's fingerprint for {name} could not be replaced")
        bad = [f for f in check_deployment(policy, edited) if f.rule == "parties" and f.severity == "error"]
        if bad:
            raise RotationError("; ".join(f.message for f in bad))
    finally:
        dep_tmp.unlink(missing_ok=True)
        pol_tmp.unlink(missing_ok=True)


def _move_old_key_files(key_dir: Path, name: str, stamp: str) -> list[Path]:
    moved = []
    for suffix in (".key", ".pub"):
        old = key_dir / f"{name}{suffix}"
        if old.exists():
            target = key_dir / "retired" / f"{name}.{stamp}{suffix}"
            target.parent.mkdir(mode=0o700, exist_ok=True)
            os.replace(old, target)
            moved.append(target)
    return moved


def _diff(old: str, new: str, path: Path) -> str:
    return "".join(difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                        fromfile=str(path), tofile=f"{path} (rotated)"))


def _write(path: Path, text: str, in_place: bool) -> Path:
    if in_place:
        shutil.copy2(path, path.with_name(path.name + ".bak"))
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        return path
    out = path.with_name(path.name + ".new")
    out.write_text(text, encoding="utf-8")
    return out


def register(keys_app: typer.Typer) -> None:
    """Add `keys rotate` to the `keys` command group."""

    @keys_app.command("rotate")
    def rotate(
        name: Annotated[str, typer.Argument(help="the peer whose keys to replace")],
        deployment: Annotated[Path, typer.Option("--deployment", "-d", help="the shared deployment.yaml")],
        dir: Annotated[Path, typer.Option("--dir", help="folder of NAME.key / NAME.pub")] = Path("keys"),
        reason: Annotated[str, typer.Option(help="why: scheduled, lost, leaked, ...")] = "scheduled",
        in_place: Annotated[bool, typer.Option("--in-place", help="edit the files (keeping FILE.bak) "
                                                                  "instead of writing FILE.new")] = False,
    ) -> None:
        """Make NAME a new identity; edit the deployment and policy; list who must sign again."""
        try:
            dep = load_deployment(deployment)
            rotation = plan_rotation(dep, name, reason=reason)
        except (ConfigError, RotationError) as exc:
            typer.echo(f"cannot rotate {name}'s keys: {exc}", err=True)
            raise typer.Exit(int(ExitCode.BAD_CONFIG)) from None
        stamp = rotation.retired["retired_at"].replace(":", "").replace("-", "")
        moved = _move_old_key_files(dir, name, stamp)
        secret, public = write_key_files(rotation.identity, dir)
        typer.echo(f"new identity for {name}: {secret} (mode 0600), {public}")
        for path in moved:
            typer.echo(f"old key file moved to {path}; once every party runs the new files, delete the old "
                       "secret (a leaked one at once): audits need only the public key, kept in retired_keys")
        old_dep, old_pol = dep.path.read_text(encoding="utf-8"), dep.policy_path.read_text(encoding="utf-8")
        dep_out = _write(dep.path, rotation.deployment_text, in_place)
        pol_out = _write(dep.policy_path, rotation.policy_text, in_place)
        typer.echo(_diff(old_dep, rotation.deployment_text, dep.path) + _diff(old_pol, rotation.policy_text,
                                                                               dep.policy_path))
        typer.echo(f"wrote {dep_out} and {pol_out}")
        typer.echo("next steps:")
        typer.echo(f"  1. send both files to every party; each checks them (`secure-split deployment diff`) and "
                   f"replaces its copies{'' if in_place else ' (rename the .new files)'}")
        typer.echo(f"  2. every party signs the changed policy ({len(rotation.parties)} signatures: "
                   f"{', '.join(rotation.parties)}):")
        for party in rotation.parties:
            key = secret if party == name else Path(f"{party}.key")
            typer.echo(f"       secure-split policy sign {dep.policy_path.name} --key {key}")
        typer.echo("  3. restart every peer with the new files; the retired key is refused from now on")
