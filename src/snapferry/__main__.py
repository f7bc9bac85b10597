"""`python -m snapferry`: the same as the `snapferry` command."""

from snapferry.cli.main import run

run()
