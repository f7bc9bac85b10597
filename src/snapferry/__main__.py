"""`python -m snapferry`: the same as the `snapferry` command."""

import sys

from snapferry.cli.main import main

sys.exit(main())
