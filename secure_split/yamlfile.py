"""Read YAML safely and remember where each key stands, so errors can name file and line.

Only `yaml.safe_load`-equivalent construction is used (SafeLoader); there is no path by which
YAML from outside can build Python objects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from secure_split.errors import ConfigError, ConfigProblem

KeyPath = tuple[str | int, ...]

# Bound what we read before parsing: configs and policies are small human-written files.
MAX_YAML_BYTES = 4 * 1024 * 1024


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


def read_yaml(path: str | Path, what: str) -> YamlDocument:
    """Read a YAML mapping from `path` with line information.

    Args:
        path: the file.
        what: what the file is, for error messages ("deployment", "peer config", "policy").

    Raises:
        ConfigError: missing, too large, not YAML, or not a mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(ConfigProblem(str(p), "-", f"{what} file not found; check the path"))
    size = p.stat().st_size
    if size > MAX_YAML_BYTES:
        raise ConfigError(
            ConfigProblem(str(p), "-", f"{what} file is {size} bytes; the limit is {MAX_YAML_BYTES}")
        )
    text = p.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(
            ConfigProblem(str(p), "-", f"not valid YAML: {getattr(exc, 'problem', exc)}", line)
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(ConfigProblem(str(p), "-", f"a {what} must be a YAML mapping of keys to values"))
    lines: dict[KeyPath, int] = {}
    if node is not None:
        _index_lines(node, (), lines)
    return YamlDocument(p, data, lines)
