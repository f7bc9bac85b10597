"""The next-step advice that ends an interruption's message: how to resume, how to give up."""

from __future__ import annotations


def resume_hint(token_of: str, receive_into: str, snapshot: str = "") -> str:
    """`token_of`: what `snapferry token` is asked; `snapshot`: what send -t needs besides the token (btrfs: the path)."""
    send = f"snapferry send -t $(snapferry token {token_of})" + (f" {snapshot}" if snapshot else "")
    return f"resume with: {send} | snapferry receive -s {receive_into}"


def abort_hint(target: str) -> str:
    return f"snapferry receive -A {target}"
