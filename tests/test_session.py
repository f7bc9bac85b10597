"""The session channel (transport/session.py) and `snapferry session` itself, run as a real process."""

from __future__ import annotations

import os
import struct
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from snapferry.transport.session import LocalSession, RemoteSession, SessionError, SessionPool, SpareSessions, read_frame, write_frame

SESSION = [sys.executable, "-m", "snapferry", "session"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@given(st.lists(st.dictionaries(st.text(max_size=12), json_values, max_size=5), max_size=5))
def test_frames_come_out_as_they_went_in(messages: list[dict[str, object]]) -> None:
    read_end, write_end = os.pipe()
    try:
        for message in messages:
            write_frame(write_end, message)
        os.close(write_end)
        write_end = -1
        assert [read_frame(read_end) for _ in messages] == messages
        assert read_frame(read_end) is None
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (struct.pack(">I", 10) + b'{"a"', "the channel ended inside a frame (4 of 10 bytes)"),
        (b"\x00\x00", "the channel ended inside a frame (2 of 4 bytes)"),
        (struct.pack(">I", 1 << 30), "not a session frame (a length of 1073741824 bytes)"),
        (struct.pack(">I", 3) + b"abc", "not a session frame (its payload is not JSON)"),
        (struct.pack(">I", 2) + b"[]", "not a session frame (its payload is not an object)"),
    ],
)
def test_a_broken_frame_is_named(data: bytes, message: str) -> None:
    read_end, write_end = os.pipe()
    os.write(write_end, data)
    os.close(write_end)
    try:
        with pytest.raises(SessionError) as error:
            read_frame(read_end)
        assert str(error.value) == message
    finally:
        os.close(read_end)


def test_one_process_answers_call_after_call() -> None:
    session = RemoteSession(SESSION)
    try:
        first = session.call(["--version"])
        assert first.returncode == 0 and first.stdout.decode().startswith("snapferry ")
        bad = session.call(["no-such-verb"])
        assert bad.returncode == 2 and any("invalid choice: 'no-such-verb'" in line for line in bad.stderr_lines)
        nested = session.call(["session"])
        assert nested.returncode == 2 and nested.stderr_lines == ["snapferry: session: session cannot run inside a session"]
        assert session.call(["--version"]) == first
        assert session.usable and session.proc.poll() is None  # the same process all along
    finally:
        session.close()
    assert session.proc.wait(timeout=10) == 0  # the end of the requests ends it


def test_the_pool_reuses_an_idle_session() -> None:
    pool = SessionPool(SESSION)
    try:
        pool.call(["--version"])
        (first,) = pool._idle
        pool.call(["--version"])
        assert pool._idle == [first]
    finally:
        pool.close()
    assert first.proc.wait(timeout=10) == 0


def test_a_peer_that_is_not_a_session_is_named() -> None:
    echo = RemoteSession(["cat"])  # answers every request with the request itself
    try:
        with pytest.raises(SessionError, match="not a snapferry session"):
            echo.call(["status", "--json", "pool/fs"])
    finally:
        echo.close()
        echo.proc.wait(timeout=10)


def test_a_far_end_without_sessions_reports_its_own_error() -> None:
    old = RemoteSession([sys.executable, "-c", "import sys; sys.stderr.write('snapferry: error: invalid choice\\n'); sys.exit(2)"])
    reply = old.call(["status", "--json", "pool/fs"])
    assert (reply.returncode, reply.stdout, reply.stderr_lines) == (2, b"", ["snapferry: error: invalid choice"])
    assert not old.usable and not reply.answered and not reply.lost  # a failure to report, not a dropped link


def test_a_killed_session_is_lost_not_failed() -> None:
    """A session killed at the far end (a reboot, a cut link) is retried by sync, not reported as the dataset's failure."""
    killed = RemoteSession(["sh", "-c", "head -c 4 >/dev/null; kill -9 $$"])
    reply = killed.call(["status", "--json", "pool/fs"])
    assert reply.lost and reply.returncode == -9


def test_a_send_stream_starts_after_its_header() -> None:
    """A send's stream follows one frame on the same pipe: the near end must hand over exactly the bytes after it."""
    session = RemoteSession(SESSION)
    started = session.stream(["send", "--json", "no-such-pool/fs@snap"])
    try:
        rest = b""
        while chunk := os.read(started.fd, 65536):
            rest += chunk
    finally:
        os.close(started.fd)
    assert rest == b""  # the send failed before its first byte, and nothing of the header is left over
    assert started.proc.wait(timeout=30) != 0
    assert started.proc.stderr is not None and b'"event": "error"' in started.proc.stderr.read()
    assert not session.usable


def test_a_local_session_runs_its_stream_on_the_descriptor_it_is_handed() -> None:
    """The descriptor crosses the unix socket (SCM_RIGHTS) and becomes the verb's stdout; ps then shows the verb."""
    session = LocalSession(SESSION[:-1])
    read_end, write_end = os.pipe()
    try:
        proc = session.launch(["--version"], write_end)
    finally:
        os.close(write_end)
    try:
        out = b""
        while chunk := os.read(read_end, 4096):
            out += chunk
    finally:
        os.close(read_end)
    assert proc.wait(timeout=30) == 0
    assert out.decode().startswith("snapferry ")


def test_a_spare_is_started_once_and_taken_once() -> None:
    spares = SpareSessions(SESSION[:-1])
    spares.warm()
    spare = spares._spare
    assert spare is not None
    spares.warm()
    assert spares._spare is spare  # still the one started ahead
    assert spares.take() is spare and spares._spare is None
    spares.warm()
    unused = spares._spare
    assert unused is not None and unused is not spare
    spares.close()
    spare.close()
    assert unused.proc.wait(timeout=30) == 0 and spare.proc.wait(timeout=30) == 0  # an unused spare just ends


def test_kept_warm_a_stream_leaves_the_next_session_started() -> None:
    """sync -r: while one dataset's stream runs, the next dataset's snapferry processes start, here and there."""
    pool = SessionPool(SESSION)
    pool.keep_warm = True
    started = pool.stream(["send", "--json", "no-such-pool/fs@snap"])
    os.close(started.fd)
    started.proc.wait(timeout=30)
    (warm,) = pool._idle
    assert warm.usable and warm.proc.pid != started.proc.pid
    spares = SpareSessions(SESSION[:-1])
    spares.keep_warm = True
    taken = spares.take()
    assert spares._spare is not None and spares._spare is not taken
    for session in (taken, spares):
        session.close()
    pool.close()
    assert warm.proc.wait(timeout=30) == 0
