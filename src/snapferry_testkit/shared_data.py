"""Where the project lead's shared/ folder is: beside the repository (CI lays a copy there too)."""

from __future__ import annotations

import os
from pathlib import Path

# src/snapferry_testkit/ is two levels below the checkout; an install outside a checkout (not editable) must set the variable.
SHARED = Path(os.environ.get("SNAPFERRY_SHARED", Path(__file__).resolve().parents[3] / "shared"))
OPENZFS_DATA = SHARED / "data" / "openzfs"
