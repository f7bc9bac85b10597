"""`snapferry serve`: an SSH forced command that lets a key run only sync's commands on allowed datasets."""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass

from snapferry.errors import Refused

_READ_ONLY_VERBS = {"send", "token", "subvolumes"}
_WRITE_VERBS = {"receive", "recv"}
ALLOW_ENV = "SNAPFERRY_SERVE_ALLOW"


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
        """The argv to run for SSH_ORIGINAL_COMMAND, or Refused."""
        try:
            argv = shlex.split(original)
        except ValueError:
            raise Refused("serve: cannot parse the requested command") from None
        if not argv:
            raise Refused("serve: this key only runs snapferry sync commands")
        if os.path.basename(argv[0]) == "zfs":
            return self._check_zfs(argv)
        if os.path.basename(argv[0]) == "zpool":
            return self._check_zpool(argv)
        for start in (1, 3):
            if _is_snapferry(argv[:start]):
                return self._check_snapferry(argv, start)
        raise Refused(f"serve: {os.path.basename(argv[0])} is not allowed for this key")

    def _check_zfs(self, argv: list[str]) -> list[str]:
        verb = argv[1] if len(argv) > 1 else ""
        writes = verb == "rollback" or argv[1:3] == ["set", "atime=off"]
        if verb != "get" and not (writes and not self.read_only):
            raise Refused(f"serve: zfs {' '.join(argv[1:3]) if verb == 'set' else verb} is not allowed for this key")
        # Positional words after the verb: get's property list (or set's assignment), then datasets.
        words = iter(argv[2:])
        positional = []
        for arg in words:
            if arg in ("-o", "-d", "-s", "-t"):
                next(words, None)
            elif not arg.startswith("-"):
                positional.append(arg)
        datasets = positional if verb == "rollback" else positional[1:]
        if not datasets:
            raise Refused(f"serve: zfs {verb} must name a dataset under --allow")
        if verb == "get" and positional[0] == "receive_resume_token" and datasets == [d.split("/", 1)[0] for d in datasets]:
            # sync asks a pool whether its zfs knows this property (is OpenZFS 0.7+).
            datasets = [d for d in datasets if not any(prefix.split("/", 1)[0] == d for prefix in self.allowed)]
        for dataset in datasets:
            self._check_dataset(dataset)
        return ["zfs", *argv[1:]]

    def _check_zpool(self, argv: list[str]) -> list[str]:
        """Only sync's question whether a pool keeps receive state (native resume), of an allowed pool."""
        if argv[1:5] != ["get", "-H", "-o", "value"] or len(argv) != 7 or not argv[5].startswith("feature@"):
            raise Refused("serve: zpool is only allowed to read a feature of a pool under --allow")
        pool = argv[6]
        if not any(prefix.split("/", 1)[0] == pool for prefix in self.allowed):
            raise Refused(f"serve: pool {pool} holds no dataset under --allow {', '.join(self.allowed)}")
        return ["zpool", *argv[1:]]

    def _check_snapferry(self, argv: list[str], start: int) -> list[str]:
        verb = argv[start] if len(argv) > start else ""
        if verb in _WRITE_VERBS and self.read_only:
            raise Refused("serve: this key is read-only: receiving is not allowed")
        if verb not in _READ_ONLY_VERBS | _WRITE_VERBS:
            raise Refused(f"serve: snapferry {verb} is not allowed for this key")
        words = iter(argv[start + 1 :])
        for arg in words:
            if arg.startswith("--z"):  # --zfs, however abbreviated
                raise Refused("serve: --zfs is not allowed for this key")
            if arg in ("-t", "--checkpoint", "--compress", "--bwlimit", "--buffer", "--mode", "--proto"):
                next(words, None)
            elif arg in ("-i", "-I"):
                base = next(words, "")
                if not base.startswith("@"):
                    self._check_dataset(base)
            elif not arg.startswith("-"):
                self._check_dataset(arg)
        return [sys.executable, "-m", "snapferry", *argv[start:]]


def _is_snapferry(words: list[str]) -> bool:
    if len(words) == 1:
        return os.path.basename(words[0]) == "snapferry"
    return len(words) == 3 and os.path.basename(words[0]).startswith("python") and words[1:] == ["-m", "snapferry"]


def serve(policy: Policy) -> int:
    """Run SSH_ORIGINAL_COMMAND if the policy allows it; never returns when it does."""
    original = os.environ.get("SSH_ORIGINAL_COMMAND")
    if original is None:
        raise Refused('serve runs as an SSH forced command: command="snapferry serve --allow POOL/FS" in authorized_keys')
    argv = policy.check(original)
    # send -t finds its snapshot by guid: tell it which datasets it may look in.
    os.environ[ALLOW_ENV] = " ".join(policy.allowed)
    os.execvp(argv[0], argv)
