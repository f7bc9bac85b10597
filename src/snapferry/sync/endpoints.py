"""The ends of a sync: where each lives (`[user@]host:pool/fs`, `host:/path`, or here), its backend, and its status."""

from __future__ import annotations

import functools
import json
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from snapferry.backends import backend_for
from snapferry.errors import Refused, SnapferryError, TransferInterrupted, UsageError, from_event
from snapferry.interface import Backend
from snapferry.transport.session import Launch, SessionError, SessionPool, SpareSessions, StartedStream, launch_command, receives
from snapferry.transport.ssh import LOCAL_SNAPFERRY, Shell

_REMOTE = re.compile(r"^(?:(?P<user>[^@:/\s]+)@)?(?P<host>[^@:/\s]+):(?P<dataset>[^:\s]+)$")
_LOCAL_DATASET = re.compile(r"^[A-Za-z0-9][\w.:-]*(/[\w.:-]+)*$")
_LOCAL_PATH = re.compile(r"^\.{0,2}/|^\.{1,2}$")
# ssh's own exit status when the connection, not the remote command, failed.
SSH_FAILED = 255


@dataclass(frozen=True)
class Endpoint:
    dataset: str  # a dataset or a directory, as the host that has it names it
    host: str | None = None
    user: str | None = None

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        remote = _REMOTE.match(text)
        if _LOCAL_PATH.match(text):
            endpoint = cls(text)
        elif remote and "/" not in remote["host"]:
            endpoint = cls(remote["dataset"], remote["host"], remote["user"])
        elif _LOCAL_DATASET.match(text):
            endpoint = cls(text)
        else:
            raise UsageError(f"not a dataset: {text!r} (expected pool/fs or [user@]host:pool/fs, or a btrfs /path or host:/path)")
        endpoint.backend().check_sync_endpoint(endpoint.dataset, remote=endpoint.host is not None)
        return endpoint

    def backend(self) -> Backend:
        return backend_for(self.dataset)

    def __str__(self) -> str:
        if self.host is None:
            return self.dataset
        return f"{self.user + '@' if self.user else ''}{self.host}:{self.dataset}"


def error_of(rc: int, stderr_lines: list[str], where: str) -> SnapferryError:
    """The error a snapferry process (maybe through ssh) ended with: its `error` event, else one by its exit status."""
    for line in reversed(stderr_lines):
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "error":
            return from_event(event)
    text = next((line for line in reversed(stderr_lines) if line.strip() and not line.startswith("{")), "")
    text = text.strip().removeprefix("snapferry: ") or f"exit status {rc}"
    if rc == SSH_FAILED:
        return TransferInterrupted(f"cannot reach {where}: {text}")
    return from_event({"code": rc if rc > 0 else 3, "message": text})


def _hold(backend: Backend, tag: str, *snapshots: str) -> bytes:
    backend.hold(tag, list(snapshots))
    return b""


def _release(backend: Backend, tag: str, *snapshots: str) -> bytes:
    backend.release(tag, list(snapshots))
    return b""


# Verbs that a local end runs in this process: each sync step holds and releases what it sends, and a new
# snapferry process for that (Python's start-up, ~0.15 s each) cost more than the zfs commands themselves.
_IN_PROCESS = {"hold": _hold, "release": _release}


@dataclass
class Side:
    """One end of a sync: `status` in one call (here: in this process; remote: one request in its session), and verbs
    run there. A remote end's calls share one snapferry process there (a session), which the step's stream may take
    over as its last request: a step then starts snapferry there once, not once to plan and once to receive."""

    endpoint: Endpoint
    shell: Shell
    # A remote end's sessions, or the local end's spare for its next stream: shared with every other dataset on
    # its host (child()).
    sessions: SessionPool | SpareSessions | None = None
    # Whether its status includes the dataset's own properties: sync reads them only from a source, with --props
    # (on zfs-fuse they cost one more zfs call, 20-40 ms, per status).
    with_properties: bool = True
    backend: Backend = field(init=False)

    def __post_init__(self) -> None:
        self.backend = self.endpoint.backend()
        if self.sessions is None:
            self.sessions = SessionPool(self.shell.snapferry_argv("session")) if self.remote else SpareSessions(LOCAL_SNAPFERRY)

    @property
    def remote(self) -> bool:
        return self.endpoint.host is not None

    def status(self) -> dict[str, Any]:
        if not self.remote:
            return self.backend.status(self.endpoint.dataset, properties=self.with_properties)
        out = self.run("status", "--json", *self._properties_flag(), self.endpoint.dataset)
        try:
            answer = json.loads(out)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise Refused(f"cannot read the status of {self.endpoint}: its snapferry answered something else (another version?)")
        return answer

    def _properties_flag(self) -> list[str]:
        return [] if self.with_properties else ["--no-properties"]

    def child(self, dataset: str) -> Side:
        """Another dataset on the same host, reached the same way."""
        return Side(Endpoint(dataset, self.endpoint.host, self.endpoint.user), self.shell, self.sessions, self.with_properties)

    def tree(self, also: tuple[str, ...] = ()) -> list[tuple[Side, dict[str, Any]]]:
        """Every dataset at and below this one, parents first, each with its status, and the status of each name in
        `also` (which may not exist yet): one call (over ssh, one round trip)."""
        if not self.remote:
            names = self.backend.descendants(self.endpoint.dataset)
            return [(self.child(name), self.backend.status(name, properties=self.with_properties)) for name in [*names, *also]]
        answers = []
        out = self.run("status", "--json", "-r", *self._properties_flag(), self.endpoint.dataset, *also)
        for line in out.decode(errors="replace").splitlines():
            try:
                answer = json.loads(line)
            except ValueError:
                answer = None
            if not isinstance(answer, dict) or not isinstance(answer.get("target"), str):
                raise Refused(f"cannot read the datasets below {self.endpoint}: its snapferry answered something else (another version?)")
            answers.append((self.child(answer["target"]), answer))
        return answers

    def run(self, *args: str) -> bytes:
        """`snapferry ARGS` at this end; its stdout, or the error it ended with."""
        if not self.remote and args[0] in _IN_PROCESS:
            return _IN_PROCESS[args[0]](self.backend, *(a for a in args[1:] if a != "--json"))
        # With --json its failure arrives as an `error` event, its class named.
        words = list(args) if "--json" in args else [args[0], "--json", *args[1:]]
        if isinstance(self.sessions, SessionPool):
            try:
                reply = self.sessions.call(words)
            except SessionError as exc:
                raise Refused(f"cannot talk to snapferry at {self.endpoint}: {exc} (another version?)") from None
            except FileNotFoundError:
                raise UsageError(f"cannot run {self.shell.ssh[0]!r}: not found") from None
            if reply.lost and reply.returncode != SSH_FAILED:  # (ssh's own failure: error_of says "cannot reach")
                raise TransferInterrupted(f"lost the connection to {self.endpoint}: {reply.stderr_lines[-1]}")
            returncode, stdout, stderr_lines = reply.returncode, reply.stdout, reply.stderr_lines
        else:
            argv = self.shell.snapferry_argv(*words)
            try:
                done = subprocess.run(argv, capture_output=True, check=False)
            except FileNotFoundError:
                raise UsageError(f"cannot run {argv[0]!r}: not found") from None
            returncode, stdout, stderr_lines = done.returncode, done.stdout, done.stderr.decode(errors="replace").splitlines()
        if returncode != 0:
            raise error_of(returncode, stderr_lines, str(self.endpoint))
        return stdout

    def warm(self) -> None:
        """Start, here, the snapferry process that this end's next stream will run in (see SpareSessions)."""
        if isinstance(self.sessions, SpareSessions):
            self.sessions.warm()

    def keep_warm(self) -> None:
        """From now on, whenever a stream takes a snapferry process at this end, start the next one meanwhile (for
        sync -r, whose next dataset then finds one started)."""
        if self.sessions is not None:
            self.sessions.keep_warm = True

    def stream(self, *args: str, session: bool = True) -> Launch | StartedStream:
        """This end of a step's pipe (`snapferry send ...` or `receive ...`): something to start on the pipe, or
        (unless not `session`) a session to this end's remote host, handed over to the stream."""
        try:
            if isinstance(self.sessions, SessionPool) and session and self.shell.sessions_carry_streams:
                return self.sessions.stream(list(args))
            if isinstance(self.sessions, SpareSessions):
                return functools.partial(self.sessions.take().launch, list(args))
        except FileNotFoundError:
            raise UsageError(f"cannot run {self.shell.ssh[0]!r}: not found") from None
        return launch_command(self.shell.snapferry_argv(*args, stream=True), receives=receives(args))

    def close(self) -> None:
        """End the sessions to this end's host (every Side of the host shares them)."""
        if self.sessions is not None:
            self.sessions.close()


def statuses(source: Side, target: Side) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both ends' status. A remote end's is asked for meanwhile: its ssh login (0.26 s on loopback) and the other
    end's zfs calls then overlap instead of adding up."""
    if not (source.remote or target.remote):
        return source.status(), target.status()
    near, far = (source, target) if target.remote else (target, source)
    with ThreadPoolExecutor(max_workers=1) as pool:
        asked = pool.submit(far.status)
        here = near.status()
        there = asked.result()
    return (here, there) if near is source else (there, here)
