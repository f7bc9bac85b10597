"""sync for btrfs: the read-only snapshots of a source directory into a target directory, resuming first."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from uuid import UUID

from snapferry.btrfs.engine.command import Subvolume
from snapferry.errors import Refused, TransferInterrupted
from snapferry.sync.driver import SteppedSync, run_pipe
from snapferry.sync.endpoints import Shell

_SSH_FAILED = 255


@dataclass(frozen=True)
class BtrfsStep:
    """One `snapferry send ... | snapferry receive -s DIR`: a resume, a full or an incremental send of one snapshot."""

    snapshot: str
    parent: str | None = None
    token: str | None = None

    def describe(self) -> str:
        if self.token is not None:
            return f"resume the interrupted transfer of {self.snapshot}"
        if self.parent is None:
            return f"full send of {self.snapshot}"
        return f"incremental {self.parent} -> {self.snapshot}"


@dataclass(frozen=True)
class Listing:
    """A directory's subvolumes (oldest first) and its unfinished receives (name -> token, None before a checkpoint)."""

    subvolumes: list[Subvolume]
    unfinished: dict[str, str | None]


def next_btrfs_step(source: list[Subvolume], target: Listing, *, no_stream: bool) -> BtrfsStep | None:
    """The next transfer, or None when the target is up to date (pure: unit-tested).

    Snapshots of different subvolumes can share a directory (home.1, root.1, home.2 ...): each
    subvolume's snapshots (same parent UUID) form their own chain, incremental from the newest one the
    target already has.
    """
    resumable = sorted((name, token) for name, token in target.unfinished.items() if token is not None)
    if resumable:
        name, token = resumable[0]
        return BtrfsStep(name, token=token)
    snapshots = [s for s in source if s.readonly]
    if not snapshots:
        raise Refused("the source directory has no read-only snapshot to send (btrfs subvolume snapshot -r)")
    received = {t.received_uuid for t in target.subvolumes if t.readonly}
    chains: dict[UUID, list[Subvolume]] = {}
    for snapshot in snapshots:  # oldest first
        chains.setdefault(snapshot.parent_uuid, []).append(snapshot)
    for chain in chains.values():
        have = [s for s in chain if s.uuid in received]
        newer = [s for s in chain if s.uuid not in received and (not have or s.otransid > have[-1].otransid)]
        if newer:
            pick = newer[-1] if no_stream else newer[0]
            return BtrfsStep(pick.name, parent=have[-1].name if have else None)
    return None


class BtrfsSync(SteppedSync[BtrfsStep]):
    """The snapshots of one directory into another (either end local or over ssh), until done, refused, or out of retries."""

    def _list(self, shell: Shell) -> Listing:
        directory = shell.endpoint.dataset
        done = subprocess.run(shell.snapferry_argv("subvolumes", directory), capture_output=True, check=False)
        if done.returncode:
            message = done.stderr.decode(errors="replace").strip().splitlines()
            text = message[-1].removeprefix("snapferry: ") if message else f"exit {done.returncode}"
            if done.returncode == _SSH_FAILED:
                raise TransferInterrupted(f"cannot reach {shell.endpoint}: {text}")
            raise Refused(f"cannot list {shell.endpoint}: {text}")
        try:
            data = json.loads(done.stdout)
            subvolumes = [Subvolume.from_json(Path(directory), item) for item in data["subvolumes"]]
            unfinished = {str(k): (str(v) if v is not None else None) for k, v in data["unfinished"].items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise Refused(f"cannot list {shell.endpoint}: its snapferry answered something else (another version?)") from None
        return Listing(subvolumes, unfinished)

    def _next(self) -> BtrfsStep | None:
        return next_btrfs_step(self._list(self.source).subvolumes, self._list(self.target), no_stream=self.options.no_stream)

    def plan(self) -> list[str]:
        """What a run would do now (--dry-run): steps applied to a model of the target."""
        source = self._list(self.source).subvolumes
        target = self._list(self.target)
        steps: list[str] = []
        while (step := next_btrfs_step(source, target, no_stream=self.options.no_stream)) is not None and len(steps) <= len(source):
            steps.append(step.describe())
            sent = next(s for s in source if s.name == step.snapshot)
            arrived = Subvolume(Path(step.snapshot), sent.uuid, sent.uuid, sent.uuid, 0, 0, True)
            unfinished = {k: v for k, v in target.unfinished.items() if k != step.snapshot}
            target = Listing([*target.subvolumes, arrived], unfinished)
        return steps or ["nothing: the destination is up to date"]

    def _run(self, step: BtrfsStep) -> None:
        directory = PurePosixPath(self.source.endpoint.dataset)
        send = ["send", *self.options.wire()]
        if step.token is not None:
            send += ["-t", step.token]
        elif step.parent is not None:
            send += ["-p", str(directory / step.parent)]
        send.append(str(directory / step.snapshot))
        receive = ["receive", "--json", "-s", *self.options.receive_checkpoint(), self.target.endpoint.dataset]
        run_pipe(self.source.snapferry_argv(*send), self.target.snapferry_argv(*receive), self.events)
