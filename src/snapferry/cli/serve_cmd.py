"""`snapferry serve`'s command line: the forced command of a restricted ssh key (the policy is in cli/serve.py)."""

from __future__ import annotations

import argparse

from snapferry.cli.serve import Policy, serve


def run(args: argparse.Namespace) -> int:
    return serve(Policy(tuple(args.allow), args.read_only))


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], common_options: argparse.ArgumentParser) -> None:
    parser = sub.add_parser("serve", help="SSH forced command: allow only sync's commands on some datasets")
    parser.add_argument("--allow", action="append", required=True, metavar="POOL/PREFIX", help="dataset (and children) allowed")
    parser.add_argument("--read-only", action="store_true", help="allow sending only, never receiving")
    parser.set_defaults(func=run, quiet=True, json=False, zfs=None)
