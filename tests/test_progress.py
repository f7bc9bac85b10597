"""The Reporter: what a person sees without --json (pytest's stderr is not a terminal: no bar)."""

from __future__ import annotations

import pytest

from snapferry.cli.progress import Reporter


def test_warnings_and_discards_reach_a_person_without_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    with Reporter("bar") as events:
        events("stream", toname="tank/x@a", offset=0)
        events("progress", bytes=5)
        events("warning", message="cannot mount 'tank/x'; mount it with: zfs mount tank/x")
        events("discard", reason="uncommitted piece", dataset="tank/x", target="tank/x")
        events("done", bytes=5)
    assert capsys.readouterr().err.splitlines() == [
        "snapferry: warning: cannot mount 'tank/x'; mount it with: zfs mount tank/x",
        "snapferry: tank/x: discarded the uncommitted piece; it holds no checkpoint, so this transfer starts from the beginning",
    ]


def test_quiet_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    with Reporter("quiet") as events:
        events("warning", message="cannot mount")
        events("discard", reason="uncommitted piece", dataset="tank/x", target="tank/x")
    assert capsys.readouterr().err == ""
