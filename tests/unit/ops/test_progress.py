"""`peer run --progress auto`: rich lines on a terminal, JSON lines on stdout otherwise (services, pipes)."""

from __future__ import annotations

import json

from secure_split.cli.main import _progress_printer


def test_auto_progress_off_a_terminal_is_one_json_object_per_line(capsys):
    emit = _progress_printer("auto")  # pytest's captured stderr is not a terminal
    emit({"event": "waiting", "peer": "hospital_a", "since": "2026-01-01T00:00:00Z"})
    emit({"event": "step", "epoch": 0, "step": 3})
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["waiting", "step"]


def test_rich_progress_says_whom_a_peer_waits_for(capsys):
    _progress_printer("rich")({"event": "waiting", "peer": "hospital_a", "since": "12:00:00"})
    err = capsys.readouterr().err
    assert "waiting" in err and "hospital_a" in err and "12:00:00" in err
