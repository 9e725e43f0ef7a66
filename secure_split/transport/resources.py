"""The open-file budget of a peer: what its transport's caps need, checked before it starts.

Every TCP connection holds a file descriptor. The connection guard keeps the number of
connections bounded (see `guard.py`), so a peer can know at start how many descriptors it may
need, and refuse to run where the process limit is lower: an outsider's connection flood must not
be what makes the peer's next checkpoint fail with "Too many open files".
"""

from __future__ import annotations

import resource

from secure_split.errors import ConfigError, ConfigProblem

__all__ = ["OPEN_FILES_BASE", "ensure_open_file_limit", "open_files_needed"]

OPEN_FILES_BASE = 128
"""Descriptors of the process itself: interpreter, data and audit files, a checkpoint being
written, libzmq's context (I/O thread, reaper, mailboxes), the ZAP thread."""
PER_SOCKET = 4  # a zmq socket's mailbox and signaler, its monitor's pair
ACCEPT_BURST = 64
"""Connections libzmq may accept between two looks of the guard thread, in a flood."""
MAX_RAISED_LIMIT = 1 << 20


def open_files_needed(counterparties: int, *, max_unauthenticated: int, connections_per_peer: int) -> int:
    """How many open files a peer with these transport caps may need at most.

    Args:
        counterparties: the peers this one exchanges messages with.
        max_unauthenticated: `limits.max_unauthenticated`.
        connections_per_peer: `limits.connections_per_peer`.

    Returns:
        OPEN_FILES_BASE + zmq sockets (one DEALER per counterparty, the ROUTER, their monitors) +
        outbound connections + every inbound connection the guard admits + ACCEPT_BURST.
    """
    sockets = PER_SOCKET * (counterparties + 2)
    inbound = counterparties * connections_per_peer + max_unauthenticated
    return OPEN_FILES_BASE + sockets + counterparties + inbound + ACCEPT_BURST


def ensure_open_file_limit(needed: int, *, what: str = "this peer") -> int:
    """Make sure the process may open `needed` files: raise the soft limit where the hard one allows.

    Call it before the transport starts.

    Args:
        needed: from `open_files_needed`.
        what: who needs them, for the error message.

    Returns:
        The soft RLIMIT_NOFILE in effect afterwards (>= needed).

    Raises:
        ConfigError: the hard limit is below `needed`; the message says how to raise it or which
            `limits.*` settings to lower.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return needed if soft == resource.RLIM_INFINITY else soft
    target = MAX_RAISED_LIMIT if hard == resource.RLIM_INFINITY else min(hard, MAX_RAISED_LIMIT)
    if target < needed:
        raise ConfigError(
            ConfigProblem(
                "deployment",
                "limits",
                f"{what} may need {needed} open files for its connection caps, but the process may open "
                f"only {hard} (RLIMIT_NOFILE hard limit): raise it (`ulimit -n {needed}`, LimitNOFILE= in a "
                "systemd unit, nofile in limits.conf), or lower limits.max_unauthenticated / "
                "limits.connections_per_peer",
            )
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target
