"""docs/internals.md names only what exists, so the contract page cannot drift silently.

What the page names, and how each is checked:
- `secure_split.a.b.C.d` (in backticks): imported, then each attribute looked up (the real objects);
- `Class.attribute` (in backticks, and in the page's pictures): a class of that name defined in
  `secure_split/` that has the attribute (defined in its body, assigned to `self.` in a method,
  or inherited from a base class defined there), found by reading the source;
- a bare `ClassName` (in backticks): a top-level class, function or constant of `secure_split/`;
- `limits.x` / `training.x`: a field of the deployment's `LimitsSpec` / `TrainingSpec`;
- a file path (`peer/node.py`, `audit/FORMAT.md`): a file of the repository, from its root, from
  `secure_split/` or from `secure_split/peer/`.
Any other dotted name in backticks must be written in one of those forms (a few third-party
names are listed below).
"""

from __future__ import annotations

import ast
import importlib
import re
from functools import cache
from pathlib import Path

import pytest

from secure_split.config import LimitsSpec, TrainingSpec

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "internals.md"
PACKAGE = ROOT / "secure_split"

# Dotted names of other projects the page may mention.
EXTERNAL = {"structlog.testing", "torch.frombuffer", "torch.load"}

_TICKS = re.compile(r"`([^`]+)`")  # a code span may go on over a line break
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_LEADING_NAME = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
_CLASS_ATTR = re.compile(r"[A-Z]\w*[a-z]\w*\.\w+")
_CLASS_ATTR_IN_PICTURE = re.compile(r"\b([A-Z]\w*[a-z]\w*)\.(\w+)")
_PATH = re.compile(r"^[\w.-]+(?:/[\w.-]+)+\.(?:py|md|toml)$|^[\w-]+\.(?:py|toml)$")
_PATH_IN_PICTURE = re.compile(r"\b[\w-]+(?:/[\w-]+)*\.py\b")


def _page() -> str:
    return PAGE.read_text(encoding="utf-8")


def _ticked() -> list[str]:
    return [" ".join(t.split()) for t in _TICKS.findall(_FENCE.sub("", _page()))]


def _pictures() -> str:
    return "\n".join(m.group(0) for m in _FENCE.finditer(_page()))


def _names() -> list[str]:
    """The leading dotted name of every ticked token (`Gate.send(to, ...)` -> `Gate.send`)."""
    out = []
    for token in _ticked():
        m = _LEADING_NAME.match(token)
        if m is None:
            continue
        out.append(m.group(0))
    return out


# -- an index of what secure_split defines, read from its source ----------------------------------


@cache
def _index() -> tuple[dict[str, list[tuple[set[str], list[str]]]], set[str]]:
    """class name -> [(its attributes, its base names)], and every top-level name."""
    classes: dict[str, list[tuple[set[str], list[str]]]] = {}
    top: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                top.add(node.name)
            elif isinstance(node, ast.Assign):
                top.update(t.id for t in node.targets if isinstance(t, ast.Name))
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                top.add(node.target.id)
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef):
                continue
            attrs: set[str] = set()
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    attrs.add(item.name)
                elif isinstance(item, ast.Assign):
                    attrs.update(t.id for t in item.targets if isinstance(t, ast.Name))
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    attrs.add(item.target.id)
            for sub in ast.walk(node):
                targets = (
                    sub.targets
                    if isinstance(sub, ast.Assign)
                    else [sub.target]
                    if isinstance(sub, ast.AnnAssign)
                    else []
                )
                for t in targets:
                    if (
                        isinstance(t, ast.Attribute)
                        and isinstance(t.value, ast.Name)
                        and t.value.id == "self"
                    ):
                        attrs.add(t.attr)
            bases = [
                b.id if isinstance(b, ast.Name) else b.attr
                for b in node.bases
                if isinstance(b, ast.Name | ast.Attribute)
            ]
            classes.setdefault(node.name, []).append((attrs, bases))
    return classes, top


def _has_attribute(cls: str, attr: str, seen: frozenset[str] = frozenset()) -> bool:
    classes, _ = _index()
    for attrs, bases in classes.get(cls, []):
        if attr in attrs:
            return True
        if any(_has_attribute(b, attr, seen | {cls}) for b in bases if b not in seen):
            return True
    return False


def _resolve(dotted: str) -> object:
    """Import the longest module prefix of `dotted`, then look up the rest as attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        name = ".".join(parts[:cut])
        try:
            obj: object = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not name.startswith(exc.name):
                raise  # a dependency is missing, not the name on the page
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


# -- the checks -------------------------------------------------------------------------------------


def test_the_page_names_enough_to_be_worth_checking() -> None:
    assert _FENCE.sub("", _page()).count("`") % 2 == 0, "an unclosed code span hides names from these checks"
    names = _names()
    assert sum(n.startswith("secure_split.") for n in names) > 60
    assert sum(bool(_CLASS_ATTR.fullmatch(n)) for n in names) > 60
    page = " ".join(_page().split())
    for order in (
        "policy → egress guards → bind → encode → audit → transport",
        "transport → header → sender → session → policy → payload → audit",
    ):
        assert order in page, f"the gate's order is stated: {order}"


@pytest.mark.parametrize("name", sorted({n for n in _names() if n.startswith("secure_split.")}))
def test_every_secure_split_name_exists(name: str) -> None:
    try:
        _resolve(name)
    except (ImportError, AttributeError) as exc:
        pytest.fail(
            f"docs/internals.md names `{name}`, which does not exist ({exc}); fix the page or the code"
        )


def test_every_class_attribute_exists() -> None:
    pairs = {tuple(n.split(".")) for n in _names() if _CLASS_ATTR.fullmatch(n)}
    pairs |= set(_CLASS_ATTR_IN_PICTURE.findall(_pictures()))
    classes, _ = _index()
    missing = sorted(f"{c}.{a}" for c, a in pairs if c not in classes or not _has_attribute(c, a))
    assert not missing, f"docs/internals.md names what secure_split does not define: {missing}"


def test_every_bare_class_name_exists() -> None:
    _, top = _index()
    bare = {n for n in _names() if re.fullmatch(r"[A-Z]\w*[a-z]\w*", n)}
    missing = sorted(bare - top)
    assert not missing, f"docs/internals.md names classes secure_split does not define: {missing}"


def test_every_setting_named_is_a_deployment_setting() -> None:
    fields = {"limits": set(LimitsSpec.model_fields), "training": set(TrainingSpec.model_fields)}
    named = {tuple(n.split(".", 1)) for n in _names() if n.split(".", 1)[0] in fields and "." in n}
    named |= {("limits", m) for m in re.findall(r"limits\.(\w+)", _page())}
    missing = sorted(f"{s}.{f}" for s, f in named if f not in fields[s])
    assert not missing, f"docs/internals.md names settings the deployment does not have: {missing}"
    unnamed = sorted(fields["limits"] - {f for s, f in named if s == "limits"})
    assert not unnamed, f"the bounds table of docs/internals.md leaves out limits: {unnamed}"


def test_every_file_named_exists() -> None:
    paths = {t for t in _ticked() if _PATH.match(t)} | set(_PATH_IN_PICTURE.findall(_pictures()))
    bases = (ROOT, PACKAGE, PACKAGE / "peer")
    missing = sorted(p for p in paths if not any((b / p).is_file() for b in bases))
    assert not missing, f"docs/internals.md names files that do not exist: {missing}"


def test_no_other_dotted_name_escapes_the_checks() -> None:
    checked = re.compile(r"secure_split\.|limits\.|training\.|[A-Z]\w*\.\w+$")
    loose = sorted(
        {
            n
            for n in _names()
            if "." in n and not checked.match(n) and n not in EXTERNAL and not _PATH.match(n)
        }
    )
    assert not loose, (
        f"docs/internals.md names {loose}: write them as `secure_split.…`, `Class.attribute` "
        "or a bare class name, so this test can check them"
    )
