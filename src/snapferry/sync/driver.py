"""Running a sync: plan a step, pipe snapferry send into snapferry receive, retry interruptions with back-off."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from snapferry.core.events import EventSink, ignore_events
from snapferry.core.process import enlarge_pipe
from snapferry.errors import Locked, Refused, StreamFormatError, TransferInterrupted
from snapferry.sync.endpoints import Shell
from snapferry.sync.plan import Rollback, Step, next_step, plan_all
from snapferry.zfs.codec.openzfs_token import OpenZfsToken
from snapferry.zfs.codec.token import ResumeToken
from snapferry.zfs.engine.command import Snapshot
from snapferry.zfs.resume.checkpoints import latest_token, read_transfers
from snapferry.zfs.resume.native import Mode, choose_mode, kernel_token

MAX_DELAY = 60.0
# Exit codes of a snapferry process on either end (through ssh, which adds 255 for its own failures).
_REFUSED, _BAD_STREAM = 4, 5


@dataclass(frozen=True)
class SyncOptions:
    no_stream: bool = False
    force: bool = False
    retries: int = 5
    deadline: float | None = None
    checkpoint: str | None = None
    compress: str = "none"
    bwlimit: str | None = None
    buffer: str | None = None
    snapshot_prefix: str | None = None
    mode: Mode | None = None
    # Whether the sync shows progress: only then does the sending side report it, and work out the
    # stream's size for the ETA (a btrfs --no-data send, or zfs send -nP).
    progress: bool = True

    def wire(self) -> list[str]:
        """The sending side's options for the link."""
        wire = ["--json" if self.progress else "-q", "--compress", self.compress]
        if self.bwlimit:
            wire += ["--bwlimit", self.bwlimit]
        if self.buffer:
            wire += ["--buffer", self.buffer]
        return wire

    def receive_checkpoint(self) -> list[str]:
        return ["--checkpoint", self.checkpoint] if self.checkpoint else []


class _Side:
    """One end's stderr, read on a thread: its JSON events go on to the sync's sink, the rest is kept."""

    def __init__(self, proc: subprocess.Popen[bytes], name: str, events: EventSink) -> None:
        self.proc = proc
        self.name = name
        self.text: list[str] = []
        self._events = events
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").strip()
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if isinstance(event, dict) and isinstance(event.get("event"), str):
                # The bar follows the sending side's bytes; a side's own "done" is not the sync's.
                if event["event"] == "done" or (event["event"] == "progress" and self.name == "receiving"):
                    continue
                fields = {k: v for k, v in event.items() if k not in ("event", "time")}
                self._events(event["event"], side=self.name, **fields)
            elif line:
                self.text.append(line)

    def message(self) -> str:
        self._thread.join()
        last = self.text[-1] if self.text else f"the {self.name} side exited with status {self.proc.returncode}"
        return last.removeprefix("snapferry: ")


def run_pipe(send_argv: list[str], receive_argv: list[str], events: EventSink = ignore_events) -> None:
    """send | receive (the receiving side with --json), with both ends' exit codes turned into one error (or none)."""
    read_end, write_end = os.pipe()
    enlarge_pipe(write_end)
    try:
        sender = subprocess.Popen(send_argv, stdout=write_end, stderr=subprocess.PIPE)
        receiver = subprocess.Popen(receive_argv, stdin=read_end, stderr=subprocess.PIPE)
    finally:
        os.close(read_end)
        os.close(write_end)
    sending, receiving = _Side(sender, "sending", events), _Side(receiver, "receiving", events)
    receive_rc = receiver.wait()
    stopped_sender = receive_rc != 0 and sender.poll() is None
    if stopped_sender:
        sender.kill()
    send_rc = sender.wait()
    send_message, receive_message = sending.message(), receiving.message()
    if receive_rc == 0 and send_rc == 0:
        return
    # Find the end that failed first: a receiver that got an empty or cut stream only reports the
    # sender's failure, and a sender whose reader went away only reports the receiver's.
    sender_first = send_rc != 0 and not stopped_sender and "receiving side closed" not in send_message
    rc, message = (send_rc, send_message) if sender_first else (receive_rc, receive_message)
    # The far end's receive of an attempt that ssh gave up on lives on until its own connection times
    # out, holding the lock: a passing state, retried with back-off.
    if rc == _REFUSED and Locked.PREFIX not in message:
        raise Refused(message)
    if rc == _BAD_STREAM:
        raise StreamFormatError(message)
    raise TransferInterrupted(message)


class Describable(Protocol):
    def describe(self) -> str: ...


StepT = TypeVar("StepT", bound=Describable)


class SteppedSync(Generic[StepT]):
    """A sync as planned steps, each planned from both ends as they are now, until none is left; retried with back-off."""

    def __init__(self, source: Shell, target: Shell, options: SyncOptions, events: EventSink = ignore_events) -> None:
        self.source = source
        self.target = target
        self.options = options
        self.events = events

    def _next(self) -> StepT | None:
        raise NotImplementedError

    def _run(self, step: StepT) -> None:
        raise NotImplementedError

    def _after_steps(self) -> None:
        """Tidying once the target is up to date."""

    def _attempt(self) -> int:
        """Every step up to date; the number done."""
        done = 0
        while (step := self._next()) is not None:
            self.events("plan", steps=[step.describe()])
            try:
                self._run(step)
            except Refused as exc:
                # The far end's receive of an abandoned attempt may have gone on meanwhile (committed
                # checkpoints past the token, or finished): a refusal stands only if the plan does.
                if self._next() == step:
                    raise
                raise TransferInterrupted(f"{exc} (the destination changed meanwhile: planning again)") from None
            done += 1
        self._after_steps()
        return done

    def run(self) -> str:
        return run_with_retries(self._attempt, self.options, self.events)


class Sync(SteppedSync[Step | Rollback]):
    """One dataset from `source` to `target`, until done, refused, or out of retries."""

    def __init__(self, source: Shell, target: Shell, options: SyncOptions, events: EventSink = ignore_events) -> None:
        super().__init__(source, target, options, events)
        self._mode: Mode | None = None

    def mode(self) -> Mode:
        """Native only when the target's pool keeps receive state and the source's zfs can send -t."""
        if self._mode is None:
            dataset = self.target.endpoint.dataset
            requested = self.options.mode
            if requested is None and not self.source.zfs().is_modern(self.source.endpoint.dataset):
                requested = "pieces"
            self._mode = choose_mode(self.target.zfs(), dataset, requested)
            self.events("mode", mode=self._mode)
        return self._mode

    def _state(self) -> tuple[list[Snapshot], list[Snapshot] | None, ResumeToken | OpenZfsToken | None]:
        """Both sides as they are now: source snapshots, target snapshots (None: no target), resume token."""
        dst_zfs = self.target.zfs()
        source = self.source.zfs().snapshots(self.source.endpoint.dataset)
        dataset = self.target.endpoint.dataset
        if not dst_zfs.exists(dataset):
            return source, None, None
        snapshots, transfers = read_transfers(dst_zfs, dataset)
        token = latest_token(transfers)
        if token is None and (native := kernel_token(dst_zfs, dataset, transfers)):
            return source, snapshots, OpenZfsToken.decode(native)
        return source, snapshots, token

    def _next(self) -> Step | Rollback | None:
        return next_step(*self._state(), no_stream=self.options.no_stream, force=self.options.force)

    def _after_steps(self) -> None:
        """Remove the checkpoints of completed transfers that a busy dataset kept from being destroyed."""
        dataset = self.target.endpoint.dataset
        _, transfers = read_transfers(self.target.zfs(), dataset)
        if any(t.complete and t.pieces() for t in transfers):
            subprocess.run(self.target.snapferry_argv("receive", "-q", "-A", dataset), capture_output=True, check=False)

    def plan(self) -> list[str]:
        """What a run would do now, without doing it (--dry-run)."""
        steps = [f"take snapshot {self._new_snapshot_name()}"] if self.options.snapshot_prefix is not None else []
        if steps:
            source, target, token = self._state()
            latest = Snapshot(self._new_snapshot_name(), 0, max((s.createtxg for s in source), default=0) + 1)
            planned = plan_all([*source, latest], target, token, no_stream=self.options.no_stream, force=self.options.force)
        else:
            planned = plan_all(*self._state(), no_stream=self.options.no_stream, force=self.options.force)
        return steps + [step.describe() for step in planned] or ["nothing: the destination is up to date"]

    def _new_snapshot_name(self) -> str:
        stamp = time.strftime("%Y-%m-%d_%H%M%S", time.gmtime())
        return f"{self.source.endpoint.dataset}@{self.options.snapshot_prefix}{stamp}"

    def _run(self, step: Step | Rollback) -> None:
        if isinstance(step, Rollback):
            self.target.zfs().rollback(step.snapshot)
            return
        wire = self.options.wire()
        if step.token is not None:
            send = self.source.snapferry_argv("send", *wire, "-t", step.token.encode())
        elif step.base is None:
            send = self.source.snapferry_argv("send", *wire, step.snapshot)
        else:
            send = self.source.snapferry_argv("send", *wire, "-I" if step.intermediates else "-i", step.base, step.snapshot)
        receive = self.target.snapferry_argv(
            "receive",
            "--json",
            "-s",
            *self.options.receive_checkpoint(),
            "--mode",
            self.mode(),
            *(["-F"] if self.options.force else []),
            self.target.endpoint.dataset,
        )
        try:
            run_pipe(send, receive, self.events)
        except Refused as exc:
            # receive's advice names its own flag; sync's is --force.
            raise Refused(str(exc).replace("use -F to roll it back", "sync --force rolls it back")) from None
        if step.base is None and (step.token is None or not step.token.fromguid):
            # A replica this sync created: with atime off, looking at it cannot count as a change
            # that would make the next incremental need --force.
            self.target.zfs().set_property(self.target.endpoint.dataset, "atime", "off")

    def run(self) -> str:
        if self.options.snapshot_prefix is not None:
            name = self._new_snapshot_name()
            self.source.zfs().snapshot(name)
            self.events("snapshot", name=name)
        return super().run()


def run_with_retries(attempt_once: Callable[[], int], options: SyncOptions, events: EventSink) -> str:
    """Call attempt_once (which returns the steps it did) until it finishes; interruptions are retried with back-off."""
    started = time.monotonic()
    delay = 1.0
    attempt = 0
    steps_done = 0
    while True:
        attempt += 1
        events("attempt", number=attempt)
        try:
            steps_done += attempt_once()
            result = "up to date" if steps_done == 0 else f"done in {steps_done} step(s), {attempt} attempt(s)"
            events("done", result=result)
            return result
        except TransferInterrupted as exc:
            late = options.deadline is not None and time.monotonic() + delay - started > options.deadline
            if attempt > options.retries or late:
                raise TransferInterrupted(f"{exc}; gave up after {attempt} attempt(s): run the same sync again to resume") from None
            events("retry", delay=delay, reason=str(exc))
            time.sleep(delay)
            delay = min(delay * 2, MAX_DELAY)
