"""Reasons written to the audit log are cut by bytes, not characters."""

from secure_split.peer.context import clip


def test_clip_keeps_short_text_and_cuts_multibyte_text_under_the_byte_limit() -> None:
    assert clip("short") == "short"
    text = "é" * 3000  # 6000 bytes
    cut = clip(text)
    assert len(cut.encode("utf-8")) <= 3000
    assert cut == "é" * 1500
