"""The one YAML reader of secure_split: bounded, safe, and able to name the line of every key.

Every YAML file the package reads (deployment, peer config, policy, and whatever the audit
verifier is handed) goes through `read_yaml`, and `dump_yaml` writes every file it generates.

What a hostile or broken file cannot do here:
- build Python objects: only SafeLoader construction (plain mappings, lists, scalars);
- exhaust memory or time with aliases ("billion laughs"): a first pass over the parser's events,
  before anything is composed, adds up how many nodes the aliases would expand to and refuses
  the file once that passes `MAX_ALIAS_NODES` (or at the first alias where a caller refuses
  aliases altogether, as the policy loader does);
- exhaust the stack with nesting: the same pass refuses containers nested deeper than
  `MAX_DEPTH` (the composer and everything that walks the data recurse);
- be larger than `MAX_YAML_BYTES`.

A refusal is a `ConfigError` naming the file, the line, what was found and what to do, raised in
time linear in the file's size (the event pass is libyaml's C parser where PyYAML has it).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from secure_split.errors import ConfigError, ConfigProblem

__all__ = [
    "MAX_ALIAS_NODES",
    "MAX_DEPTH",
    "MAX_YAML_BYTES",
    "KeyPath",
    "YamlDocument",
    "dump_yaml",
    "read_yaml",
]

KeyPath = tuple[str | int, ...]

# Bound what we read before parsing: configs and policies are small human-written files.
MAX_YAML_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 64
"""Containers nested deeper than this are refused (a deployment needs about 8 levels)."""
MAX_ALIAS_NODES = 10_000
"""The most nodes all aliases of one file may expand to together (an alias of a 3-key mapping
adds 7 nodes: the mapping, 3 keys, 3 values)."""

_SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~10x faster


class _NoAliasDumper(yaml.SafeDumper):
    """SafeDumper that writes a value shared between two places twice instead of as &anchor/*alias."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_yaml(data: Any) -> str:
    """YAML text for `data`, written without anchors or aliases, keys in insertion order.

    `yaml.safe_dump` writes an anchor and an alias for any object that appears twice (two segments
    with one layer list); our readers refuse aliases in policies and bound them elsewhere, and a
    file people sign and audit should read as what it means.

    Args:
        data: plain data (mappings, lists, scalars).

    Returns:
        The YAML text.
    """
    return yaml.dump(data, Dumper=_NoAliasDumper, sort_keys=False)


def _index_lines(node: yaml.Node, path: KeyPath, out: dict[KeyPath, int]) -> None:
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
            out[(*path, key)] = key_node.start_mark.line + 1
            _index_lines(value_node, (*path, key), out)
            out[(*path, key)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_lines(item, (*path, i), out)


class YamlDocument:
    """A parsed YAML mapping plus a map from key paths to line numbers."""

    def __init__(self, path: Path, data: dict[str, Any], lines: dict[KeyPath, int]) -> None:
        self.path = path
        self.data = data
        self.lines = lines

    def line_of(self, key_path: KeyPath) -> int | None:
        """Line of the deepest known prefix of `key_path` (1-based), or None."""
        p = tuple(key_path)
        while p:
            if p in self.lines:
                return self.lines[p]
            p = p[:-1]
        return self.lines.get(())

    def problem(self, key_path: KeyPath, message: str) -> ConfigProblem:
        """Build a ConfigProblem for `key_path` in this file."""
        key = ".".join(str(k) for k in key_path) or "(top level)"
        return ConfigProblem(file=str(self.path), key=key, message=message, line=self.line_of(key_path))


def _events(text: str) -> Iterator[yaml.Event]:
    loader = _SafeLoader(text)
    try:
        while loader.check_event():
            yield loader.get_event()  # type: ignore[no-untyped-call]  # PyYAML's stubs leave it untyped
    finally:
        loader.dispose()


def _check_shape(text: str, path: Path, what: str, *, aliases: bool) -> None:
    """Refuse deep nesting and alias expansion before anything is composed (one pass, no recursion).

    Raises:
        ConfigError: nesting deeper than MAX_DEPTH, an alias where `aliases` is False, or aliases
            that would expand to more than MAX_ALIAS_NODES nodes.
        yaml.YAMLError: the text is not YAML (the caller reports it with its line).
    """

    def refuse(event: yaml.Event, message: str) -> ConfigError:
        mark = event.start_mark
        return ConfigError(ConfigProblem(str(path), "-", message, None if mark is None else mark.line + 1))

    sizes: dict[str, int] = {}  # anchor -> nodes its value expands to
    open_nodes: list[tuple[str | None, int]] = []  # (anchor, nodes so far) per open container
    expanded = 0
    for event in _events(text):
        if isinstance(event, yaml.CollectionStartEvent):
            if len(open_nodes) >= MAX_DEPTH:
                raise refuse(
                    event,
                    f"containers are nested more than {MAX_DEPTH} levels deep; no {what} needs that: "
                    "check that the file was written by hand or by secure-split, not generated by a loop",
                )
            if event.anchor is not None and not aliases:
                raise refuse(event, _NO_ALIASES.format(what=what))
            open_nodes.append((event.anchor, 1))
            continue
        if isinstance(event, yaml.CollectionEndEvent):
            anchor, size = open_nodes.pop()
            if anchor is not None:
                sizes[anchor] = size
        elif isinstance(event, yaml.ScalarEvent):
            size = 1
            if event.anchor is not None:
                if not aliases:
                    raise refuse(event, _NO_ALIASES.format(what=what))
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.AliasEvent):
            if not aliases:
                raise refuse(event, _NO_ALIASES.format(what=what))
            size = sizes.get(event.anchor or "", 1)  # an unknown anchor: the composer reports it
            expanded += size
            if expanded > MAX_ALIAS_NODES:
                raise refuse(
                    event,
                    f"YAML aliases (*{event.anchor}) in this {what} expand to more than {MAX_ALIAS_NODES} "
                    "values; write the values out, or use fewer aliases of large blocks",
                )
        else:
            continue
        if open_nodes:
            anchor, so_far = open_nodes[-1]
            open_nodes[-1] = (anchor, so_far + size)


_NO_ALIASES = "YAML anchors and aliases (&name, *name) are not allowed in a {what}; write each value out"


def read_yaml(path: str | Path, what: str, *, aliases: bool = True) -> YamlDocument:
    """Read a YAML mapping from `path` with line information, within the bounds of this module.

    Args:
        path: the file.
        what: what the file is, for error messages ("deployment", "peer config", "policy").
        aliases: False refuses any anchor or alias (policies: a signed file reads as it means);
            True admits them up to `MAX_ALIAS_NODES` expanded nodes.

    Returns:
        The document: its data (plain dicts, lists, scalars) and the line of every key.

    Raises:
        ConfigError: missing, too large, not UTF-8, not YAML, nested too deep, aliases refused or
            over the budget, or not a mapping; always with the file and, where known, the line.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(ConfigProblem(str(p), "-", f"{what} file not found; check the path"))
    size = p.stat().st_size
    if size > MAX_YAML_BYTES:
        raise ConfigError(
            ConfigProblem(str(p), "-", f"{what} file is {size} bytes; the limit is {MAX_YAML_BYTES}")
        )
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            ConfigProblem(str(p), "-", f"{what} file is not UTF-8 text (byte {exc.start}); save it as UTF-8")
        ) from None
    try:
        _check_shape(text, p, what, aliases=aliases)
        loader = _SafeLoader(text)
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(
            ConfigProblem(str(p), "-", f"not valid YAML: {getattr(exc, 'problem', None) or exc}", line)
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(ConfigProblem(str(p), "-", f"a {what} must be a YAML mapping of keys to values"))
    lines: dict[KeyPath, int] = {}
    if node is not None:
        _index_lines(node, (), lines)
    return YamlDocument(p, data, lines)
