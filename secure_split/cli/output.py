"""How the CLI talks to people: errors as advice on stderr, results as tables."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape

err_console = Console(stderr=True, highlight=False, emoji=False)  # no ":b:" -> emoji in a key
console = Console(highlight=False, emoji=False)


def report_error(exc: BaseException) -> None:
    """Print an error as advice: what happened and what to do."""
    err_console.print(f"[bold red]error:[/] {escape(type(exc).__name__)}: {escape(str(exc))}", soft_wrap=True)
