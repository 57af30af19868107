"""Progress bars: quarter lines in a log, in-place redraws on a terminal."""

from __future__ import annotations

import io

from services.demo.progress import ProgressBoard


def test_a_log_gets_a_line_per_state_change_and_per_quarter():
    out = io.StringIO()
    board = ProgressBoard(["customer A finance", "customer B legal"], stream=out, live=False)
    board.update("customer A finance", state="RUNNING", total=100)
    for step in range(1, 101):
        board.update("customer A finance", step=step, loss=1.0 / step, tokens_per_second=500.0, eta_seconds=1.0)
    board.update("customer A finance", state="SUCCEEDED")
    lines = out.getvalue().splitlines()
    assert len(lines) == 6  # RUNNING, 25/50/75/100 %, SUCCEEDED
    assert " 25/100" in lines[1] and "100/100" in lines[4] and lines[5].endswith("SUCCEEDED")
    assert "[" + "#" * 24 + "]" in lines[5] and "loss  0.0100" in lines[5]
    assert not any("customer B" in line for line in lines)  # B never changed


def test_a_terminal_redraws_every_bar_in_place():
    out = io.StringIO()
    board = ProgressBoard(["a", "b"], stream=out, live=True)
    board.update("a", state="RUNNING", total=10, step=5)
    board.update("b", state="RUNNING", total=10, step=1)
    text = out.getvalue()
    assert text.count("\x1b[2K") == 4 and text.count("\x1b[2F") == 1  # second draw moves up two lines first
    assert "5/10" in text and "1/10" in text


def test_a_terminal_is_redrawn_at_most_every_interval_but_always_on_a_state_change():
    out = io.StringIO()
    board = ProgressBoard(["a"], stream=out, live=True, min_redraw_seconds=3600)
    board.update("a", state="RUNNING", total=100)
    for step in range(1, 101):
        board.update("a", step=step)
    board.update("a", state="SUCCEEDED")
    frames = out.getvalue().count("\x1b[2K")
    assert frames == 2 and "100/100" in out.getvalue().splitlines()[-1]
