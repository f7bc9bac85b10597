"""Running a sync: plan a step from both ends' status, pipe snapferry send into snapferry receive, retry with back-off."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from snapferry.core.events import EventSink, ignore_events
from snapferry.core.process import enlarge_pipe
from snapferry.errors import (
    ReceiverGone,
    Refused,
    SnapferryError,
    StaleToken,
    StreamFormatError,
    TransferInterrupted,
    UsageError,
    from_event,
)
from snapferry.interface import Action, SyncPolicy, SyncStep, Transfer
from snapferry.sync.endpoints import Side, error_of, statuses
from snapferry.transport.session import Launch, StartedStream, launch_command

MAX_DELAY = 60.0


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
    take_snapshot: bool = False  # --snapshot
    snapshot_prefix: str = "snapferry_"  # of the snapshots sync takes, and the only ones it ever prunes
    mode: str | None = None
    hold_tag: str | None = None  # see SyncPolicy
    discard_changes: bool = False  # see SyncPolicy
    send_flags: tuple[str, ...] = ()  # see SyncPolicy
    keep_source: int | None = None  # see SyncPolicy
    keep_target: int | None = None
    props: bool = False  # see SyncPolicy
    exclude_props: tuple[str, ...] = ()
    set_props: tuple[tuple[str, str], ...] = ()
    restart_on_stale: bool = False  # --on-stale restart: give up a transfer the source can no longer continue
    # Whether the sync shows progress: only then does the sending side report it, and work out the
    # stream's size for the ETA (a btrfs --no-data send, or zfs send -nP).
    progress: bool = True

    def wire(self) -> list[str]:
        """The sending side's options for the link. It always reports in JSON, so that its failure arrives as an
        `error` event; -q leaves out everything else."""
        wire = ["--json", *([] if self.progress else ["-q"]), "--compress", self.compress]
        if self.bwlimit:
            wire += ["--bwlimit", self.bwlimit]
        if self.buffer:
            wire += ["--buffer", self.buffer]
        return wire

    def receive_checkpoint(self) -> list[str]:
        return ["--checkpoint", self.checkpoint] if self.checkpoint else []

    def policy(self) -> SyncPolicy:
        return SyncPolicy(
            no_stream=self.no_stream,
            force=self.force,
            mode=self.mode,
            take_snapshot=self.take_snapshot,
            hold_tag=self.hold_tag,
            discard_changes=self.discard_changes,
            send_flags=self.send_flags,
            prefix=self.snapshot_prefix,
            keep_source=self.keep_source,
            keep_target=self.keep_target,
            props=self.props,
            exclude_props=self.exclude_props,
            set_props=self.set_props,
        )


class _Relay:
    """One end's stderr, read on a thread: its JSON events go on to the sync's sink, its `error` event is kept."""

    def __init__(self, proc: subprocess.Popen[bytes], name: str, events: EventSink) -> None:
        self.proc = proc
        self.name = name
        self.lines: list[str] = []
        self.error: SnapferryError | None = None
        self.done_bytes = 0  # the stream bytes its `done` events report
        self.status: dict[str, Any] | None = None  # receive --status-after's
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
                kind = event["event"]
                if kind == "error":
                    self.error = from_event(event)
                elif kind == "done" and isinstance(event.get("bytes"), int):
                    self.done_bytes = max(self.done_bytes, event["bytes"])
                elif kind == "status" and isinstance(event.get("status"), dict):
                    self.status = event["status"]
                # The bar follows the sending side's bytes; a side's own "done" is not the sync's.
                elif kind != "done" and not (kind == "progress" and self.name == "receiving"):
                    fields = {k: v for k, v in event.items() if k not in ("event", "time")}
                    self._events(kind, side=self.name, **fields)
            elif line:
                self.lines.append(line)

    def wait(self) -> None:
        """Until every line of its stderr is read."""
        self._thread.join()

    def failure(self, rc: int) -> SnapferryError:
        """What this end failed with: the error it reported, else one from its exit status."""
        self.wait()
        if self.error is not None:
            return self.error
        if rc < 0 or not self.lines:
            return TransferInterrupted(f"the {self.name} side ended with {'signal ' + str(-rc) if rc < 0 else 'status ' + str(rc)}")
        return error_of(rc, self.lines, f"the {self.name} side")


def run_pipe(
    send: list[str] | Launch | StartedStream, receive: list[str] | Launch | StartedStream, events: EventSink = ignore_events
) -> tuple[int, dict[str, Any] | None]:
    """send | receive; the stream bytes received and the receiving end's status after it (when it reports one), or the
    failure of whichever end failed first, raised as its own error. Either end (not both) may be a remote session
    that already took its stream over: its descriptor is then the pipe's end."""
    send = launch_command(send, receives=False) if isinstance(send, list) else send
    receive = launch_command(receive, receives=True) if isinstance(receive, list) else receive
    read_end = write_end = -1
    try:
        if isinstance(send, StartedStream):
            if isinstance(receive, StartedStream):
                raise ValueError("a pipe between two remote sessions would need a copy here")
            read_end, sender = send.fd, send.proc
            receiver = receive(read_end)
        elif isinstance(receive, StartedStream):
            write_end, receiver = receive.fd, receive.proc
            sender = send(write_end)
        else:
            read_end, write_end = os.pipe()
            enlarge_pipe(write_end)
            sender = send(write_end)
            receiver = receive(read_end)
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)
    sending, receiving = _Relay(sender, "sending", events), _Relay(receiver, "receiving", events)
    receive_rc = receiver.wait()
    stopped_sender = receive_rc != 0 and sender.poll() is None
    if stopped_sender:
        sender.kill()
    send_rc = sender.wait()
    if receive_rc == 0 and send_rc == 0:
        receiving.wait()
        return receiving.done_bytes, receiving.status
    # Find the end that failed first: a receiver that got an empty or cut stream only reports the
    # sender's failure, and a sender whose reader went away only reports the receiver's.
    send_failure = sending.failure(send_rc) if send_rc != 0 else None
    receive_failure = receiving.failure(receive_rc) if receive_rc != 0 else None
    sender_first = send_failure is not None and not stopped_sender and not isinstance(send_failure, ReceiverGone)
    failure = send_failure if sender_first or receive_failure is None else receive_failure
    assert failure is not None
    if isinstance(failure, (Refused, StreamFormatError, UsageError)) and not failure.retryable:
        raise failure
    # Anything else is retried with back-off: a lock that the far end's receive of an abandoned attempt
    # still holds (until its own connection times out), a dropped link, a zfs command that failed this time.
    raise failure if isinstance(failure, TransferInterrupted) else TransferInterrupted(str(failure))


class Describable(Protocol):
    def describe(self) -> str: ...


StepT = TypeVar("StepT", bound=Describable)


class SteppedSync(Generic[StepT]):
    """A sync as planned steps, each planned from both ends as they are now, until none is left; retried with back-off."""

    options: SyncOptions
    events: EventSink

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


@dataclass
class SyncStats:
    """What a sync run did, for its summary line and its metrics."""

    received_bytes: int = 0
    resumes: int = 0
    retries: int = 0
    source_status: dict[str, Any] | None = None
    target_status: dict[str, Any] | None = None


class Sync(SteppedSync[SyncStep]):
    """One file system (or snapshot directory) from `source` to `target`, until done, refused, or out of retries.

    Planning costs one `status` call per end: here a call into the backend, over ssh one round trip.
    """

    def __init__(self, source: Side, target: Side, options: SyncOptions, events: EventSink = ignore_events) -> None:
        if source.backend.name != target.backend.name:
            raise SnapferryError("sync goes between two ends of the same kind")
        self.source = source
        self.target = target
        self.options = options
        self.stats = SyncStats()
        self.events = self._counting(events)
        self.planner = source.backend.planner(options.policy(), source.endpoint.dataset, target.endpoint.dataset)
        # Both ends' statuses, just taken by the caller (sync -r's one call per tree): the first plan uses them.
        self.known_statuses: tuple[dict[str, Any], dict[str, Any]] | None = None
        # The destination's status as its receive reported it at the end of the last step: the next plan uses it.
        self._target_after: dict[str, Any] | None = None

    def _counting(self, events: EventSink) -> EventSink:
        def count(event: str, **fields: Any) -> None:
            if event == "retry":
                self.stats.retries += 1
            events(event, **fields)

        return count

    def _next(self) -> SyncStep | None:
        # The snapferry that this end's part of the step's stream will run starts meanwhile.
        for side in (self.source, self.target):
            side.warm()
        if self.known_statuses is not None:
            (self.stats.source_status, self.stats.target_status), self.known_statuses = self.known_statuses, None
        elif self._target_after is not None:
            self.stats.source_status = self.source.status()
            self.stats.target_status, self._target_after = self._target_after, None
        else:
            self.stats.source_status, self.stats.target_status = statuses(self.source, self.target)
        return self.planner.next_step(self.stats.source_status, self.stats.target_status)

    def _after_steps(self) -> None:
        # Only clutter (checkpoints of completed transfers a busy dataset kept, holds no longer needed): never fails the sync.
        self._run_quietly(self.planner.tidy(self.stats.source_status or {}, self.stats.target_status or {}))

    def _run_quietly(self, actions: tuple[Action, ...] | list[Action]) -> None:
        for action in actions:
            try:
                self._run(action)
            except SnapferryError as exc:
                self.events("warning", message=f"{action.describe()}: {exc}")

    def plan(self) -> list[str]:
        """What a run would do now, without doing it (--dry-run)."""
        name = self._new_snapshot_name()
        steps = self.planner.plan_all(self.source.status(), self.target.status(), name)
        return [step.describe() for step in steps] or ["nothing: the destination is up to date"]

    def _new_snapshot_name(self) -> str | None:
        if not self.options.take_snapshot:
            return None
        return f"{self.options.snapshot_prefix}{time.strftime('%Y-%m-%d_%H%M%S', time.gmtime())}"

    def _run(self, step: SyncStep) -> None:
        if isinstance(step, Action):
            (self.source if step.on_source else self.target).run(*step.args)
            return
        self.stats.resumes += step.resumes
        self._target_after = None
        self._run_quietly(step.before)
        send_args = ("send", *self.options.wire(), *step.send_args)
        receive_args = ("receive", "--json", "--status-after", "-s", *self.options.receive_checkpoint(), *step.receive_args)
        try:
            receive = self.target.stream(*receive_args)
            # Only one end's session can carry the stream (two would need a copy through this process).
            send = self.source.stream(*send_args, session=not isinstance(receive, StartedStream))
            received, status = run_pipe(send, receive, self.events)
            self.stats.received_bytes += received
            # What runs after the step on the destination would change its status: then it is asked again.
            if status is not None and status.get("target") == self.target.endpoint.dataset and all(a.on_source for a in step.after):
                self._target_after = status
        except StaleToken as exc:
            if not (self.options.restart_on_stale and step.abort is not None):
                raise
            self._restart(step.abort, exc)
        except Refused as exc:
            raise Refused(_with_advice(str(exc), step)) from None
        self._run_quietly(step.after)

    def _restart(self, abort: Action, stale: StaleToken) -> None:
        """--on-stale restart: give up the transfer the source can no longer continue, and send it again (retried)."""
        summary = self.target.backend.summarize(self.stats.target_status or {}) if self.stats.target_status else None
        lost = sum(item.bytes_done or 0 for item in summary.unfinished) if summary is not None else 0
        self.events(
            "warning", message=f"{stale}; --on-stale restart: {abort.describe()}, throwing away {lost} committed bytes, and send again"
        )
        self._run(abort)
        raise TransferInterrupted("restarting the transfer after a stale token (--on-stale restart)")

    def lag(self) -> float | None:
        """Age of the newest snapshot both ends have, as of the last planning (None: unknown, or none in common)."""
        stats = self.stats
        if stats.source_status is None or stats.target_status is None:
            return None
        try:
            common = self.target.backend.summarize(stats.target_status, stats.source_status).common
        except (SnapferryError, KeyError, ValueError, TypeError):
            return None
        return time.time() - common.created if common is not None and common.created else None

    def take_snapshot(self, recursive: bool = False) -> None:
        """sync --snapshot: a new snapshot of the source (-r: of its whole tree at once)."""
        name = self._new_snapshot_name()
        if name is not None:
            step = self.planner.snapshot_step(name, recursive)
            self._run(step)
            self.events("snapshot", name=step.args[-1])

    def run(self) -> str:
        self.take_snapshot()
        return super().run()


def _with_advice(message: str, step: Transfer) -> str:
    for said, instead in step.advice:
        message = message.replace(said, instead)
    return message


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
