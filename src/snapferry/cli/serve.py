"""`snapferry serve`: an SSH forced command that lets a key run only sync's snapferry verbs, on allowed datasets."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass

from snapferry.cli.common import backend
from snapferry.errors import Refused, SnapferryError, as_event

# hold and release only touch snapferry's own holds (tag snapferry:...), which a sending key needs to place.
# session: each request in it is checked like a command of its own.
_READ_ONLY_VERBS = {"send", "token", "status", "subvolumes", "hold", "release", "holds", "session"}
_WRITE_VERBS = {"receive", "recv", "rollback", "snapshot", "prune"}
# Properties a restricted key may have set on what it receives (sync --props): none that mounts, shares or
# exposes anything on the host. User properties (with a colon) are only labels.
_RECEIVE_PROPERTIES = {
    "atime", "readonly", "compression", "checksum", "copies", "recordsize", "dedup", "xattr", "aclinherit", "aclmode",
    "acltype", "snapdir", "logbias", "primarycache", "secondarycache", "sync", "dnodesize", "special_small_blocks",
    "redundant_metadata", "relatime", "quota", "refquota", "reservation", "refreservation", "canmount",
}  # fmt: skip
ALLOW_ENV = "SNAPFERRY_SERVE_ALLOW"


def visibility_from_env() -> Callable[[str], bool]:
    """For send -t under serve: which datasets its snapshot may be looked up in (find by guid searches every pool)."""
    allowed = os.environ.get(ALLOW_ENV)
    if allowed is None:
        return lambda dataset: True
    return Policy(tuple(allowed.split()), read_only=True).dataset_allowed


@dataclass(frozen=True)
class Policy:
    allowed: tuple[str, ...]
    read_only: bool

    def dataset_allowed(self, name: str) -> bool:
        if name.startswith("/"):
            return self._path_allowed(name)
        dataset = name.partition("@")[0]
        return any(dataset == prefix or dataset.startswith(prefix.rstrip("/") + "/") for prefix in self.allowed)

    def _path_allowed(self, path: str) -> bool:
        """A btrfs path under an allowed directory, as written and once its symlinks are resolved."""
        if any(part in (".", "..") for part in path.split("/")):
            return False

        def under(candidate: str, prefix: str) -> bool:
            return candidate == prefix or candidate.startswith(prefix.rstrip("/") + "/")

        prefixes = [p for p in self.allowed if p.startswith("/")]
        real = os.path.realpath(path)
        return any(under(path, p) for p in prefixes) and any(under(real, os.path.realpath(p)) for p in prefixes)

    def _check_dataset(self, name: str) -> None:
        if not self.dataset_allowed(name):
            what = f"path {name}" if name.startswith("/") else f"dataset {name.partition('@')[0]}"
            raise Refused(f"serve: {what} is outside --allow {', '.join(self.allowed)}")

    def check(self, original: str) -> list[str]:
        """snapferry's words (verb and arguments) to run for SSH_ORIGINAL_COMMAND, or Refused. Only snapferry verbs,
        parsed by snapferry's own parser."""
        try:
            argv = shlex.split(original)
        except ValueError:
            raise Refused("serve: cannot parse the requested command") from None
        if not argv:
            raise Refused("serve: this key only runs snapferry sync commands")
        for start in (1, 3):
            if _is_snapferry(argv[:start]):
                self.check_verb(argv[start:])
                return argv[start:]
        raise Refused(f"serve: {os.path.basename(argv[0])} is not allowed for this key")

    def check_verb(self, words: list[str]) -> argparse.Namespace:
        """The parsed command, if this key may run it: an allowed verb, and every dataset or path it could touch allowed."""
        verb = words[0] if words else ""
        if verb in _WRITE_VERBS and self.read_only:
            raise Refused(f"serve: this key is read-only: {'receiving' if verb in ('receive', 'recv') else verb} is not allowed")
        if verb not in _READ_ONLY_VERBS | _WRITE_VERBS:
            raise Refused(f"serve: snapferry {verb} is not allowed for this key")
        args = _parse(words)
        if args.zfs is not None:
            raise Refused("serve: --zfs is not allowed for this key")
        if getattr(args, "ssh", "ssh") != "ssh" or getattr(args, "remote_snapferry", "snapferry") != "snapferry":
            raise Refused("serve: --ssh and --remote-snapferry are not allowed for this key")
        for name in _targets(args):
            self._check_dataset(name)
        for name, _ in getattr(args, "o", None) or ():
            if name not in _RECEIVE_PROPERTIES and ":" not in name:
                raise Refused(f"serve: receive -o {name} is not allowed for this key (only {', '.join(sorted(_RECEIVE_PROPERTIES))})")
        if verb == "rollback":
            # Everything a rollback would destroy must be ours to destroy, clones elsewhere included.
            for name in backend(args, args.snapshot).rollback_casualties(args.snapshot):
                self._check_dataset(name)
        return args


def _parse(words: list[str]) -> argparse.Namespace:
    """snapferry's own parser over the words; a parse error is a refusal with argparse's own reason."""
    from snapferry.cli.main import build_parser

    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            return build_parser().parse_args(words)
    except SystemExit:
        reason = said.getvalue().strip().splitlines()
        raise Refused(f"serve: cannot parse the requested command ({reason[-1] if reason else 'bad arguments'})") from None


def _targets(args: argparse.Namespace) -> list[str]:
    """Every dataset, snapshot or path the parsed command names."""
    names = [getattr(args, key, None) for key in ("snapshot", "dataset", "directory", "parent", "i", "I", "source")]
    names += getattr(args, "protect", None) or []
    names += (getattr(args, "targets", None) or []) + (getattr(args, "snapshots", None) or [])
    if not getattr(args, "decode", False):
        names.append(getattr(args, "target", None))
    names += [c for c in getattr(args, "c", None) or [] if c]
    return [n for n in names if isinstance(n, str) and n and not n.startswith("@")]


def _is_snapferry(words: list[str]) -> bool:
    if len(words) == 1:
        return os.path.basename(words[0]) == "snapferry"
    return len(words) == 3 and os.path.basename(words[0]).startswith("python") and words[1:] == ["-m", "snapferry"]


def serve(policy: Policy) -> int:
    """Run SSH_ORIGINAL_COMMAND if the policy allows it, in this process; its exit status."""
    original = os.environ.get("SSH_ORIGINAL_COMMAND")
    if original is None:
        raise Refused('serve runs as an SSH forced command: command="snapferry serve --allow POOL/FS" in authorized_keys')
    try:
        argv = policy.check(original)
    except SnapferryError as exc:
        # The caller (sync) reads a refusal as its `error` event when it asked for --json.
        if "--json" in original.split():
            print(json.dumps({"event": "error", **as_event(exc)}), file=sys.stderr)
        raise
    # send -t finds its snapshot by guid: tell it which datasets it may look in.
    os.environ[ALLOW_ENV] = " ".join(policy.allowed)
    if argv[0] == "session":
        from snapferry.cli.session_cmd import run_session

        return run_session(check=policy.check_verb)
    # In this process rather than a new one: a second Python start-up would add 0.07 s to every call.
    from snapferry.cli.main import main

    return main(argv)
