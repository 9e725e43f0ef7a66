"""Claims of SECURITY.md ("Bounds") and README ("Configuration") about `limits.*`: every setting of
the deployment schema is documented in both, with its real default, and every test the table
cites exists. A setting added, renamed or re-defaulted without its documentation fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from secure_split.config import LimitsSpec

ROOT = Path(__file__).resolve().parents[2]
SECURITY = (ROOT / "SECURITY.md").read_text()
README = (ROOT / "README.md").read_text()
FIELDS = LimitsSpec.model_fields


def _bounds_rows() -> list[list[str]]:
    section = SECURITY.split("## Bounds", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| what")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows if not row.startswith("|---")]


def _default_text(value: object) -> str:
    return str(value)


def test_every_limits_setting_has_a_row_in_the_bounds_table_with_its_default() -> None:
    documented: dict[str, str] = {}
    for what, setting, default, *_ in _bounds_rows():
        names = re.findall(r"`limits\.(\w+)`", setting)
        defaults = [d.strip() for d in re.split(r",| within ", default)]
        for name, value in zip(names, defaults, strict=False):
            documented[name] = value
        assert what
    assert set(documented) >= set(FIELDS) - {"handshake_timeout_s", "peer_timeout_s", "heartbeat_s"}
    for name, value in documented.items():
        assert name in FIELDS, f"SECURITY.md documents limits.{name}, which the schema does not have"
        default = FIELDS[name].default
        assert value.split()[0] == _default_text(default), (name, value, default)


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_every_limits_setting_is_in_the_readme_with_its_default(name: str) -> None:
    match = re.search(rf"^\s+{name}: (\S+)", README, re.MULTILINE)
    assert match, f"README's limits example lacks {name}"
    assert match.group(1) == _default_text(FIELDS[name].default)


def test_every_test_the_bounds_table_cites_exists() -> None:
    sources = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py"))
    for row in _bounds_rows():
        if row[-1] != "the same":
            assert re.findall(r"`(test_\w+)`", row[-1]), f"no test pins the bound on {row[0]!r}"
        for name in re.findall(r"`(test_\w+)`", row[-1]):
            assert f"def {name}(" in sources, name
