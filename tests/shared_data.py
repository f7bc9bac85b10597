"""Where the project lead's shared/ folder is: beside the repository (CI lays a copy there too)."""

from __future__ import annotations

import os
from pathlib import Path

SHARED = Path(os.environ.get("SNAPFERRY_SHARED", Path(__file__).resolve().parents[2] / "shared"))
OPENZFS_DATA = SHARED / "data" / "openzfs"
