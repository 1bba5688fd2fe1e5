"""Whether a process still exists: how a folder named after the process that made it (an upload's staging,
the metrics of one `dsm serve`) is known to be left over."""

from __future__ import annotations

import os


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's: it exists
        return True
    return True
