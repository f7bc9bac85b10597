"""A slow link for tests and benches: runs a command (ssh) with its standard input fed at a set rate, and logs the bytes.

    python3 -m snapferry_testkit.throttle LOG RATE DOWN CMD...

RATE is bytes a second. The total fed is appended to LOG when CMD ends. While the file DOWN exists, the
link is down: the port it names (or 1) is given to ssh first, with a one-second connect timeout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time


def main(argv: list[str]) -> int:
    log, rate, down, command = argv[0], float(argv[1]), argv[2], argv[3:]
    if os.path.exists(down):
        # ssh takes the first -p and -o ConnectTimeout it is given.
        with open(down) as named:
            port = named.read().strip() or "1"
        command = [command[0], "-p", port, "-o", "ConnectTimeout=1", *command[1:]]
    child = subprocess.Popen(command, stdin=subprocess.PIPE)
    assert child.stdin is not None
    total = 0

    def pump() -> None:
        nonlocal total
        start = time.monotonic()
        try:
            while chunk := os.read(0, 1 << 16):
                child.stdin.write(chunk)  # type: ignore[union-attr]
                child.stdin.flush()  # type: ignore[union-attr]
                total += len(chunk)
                ahead = total / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
            child.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    rc = child.wait()
    thread.join(timeout=2)
    with open(log, "a") as out:
        out.write(f"{total}\n")
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
