"""Reading a process's ``/proc/<pid>/stat`` (Linux), for the benchmark's servers and load.

Kept apart from ``bench.servers`` so that the load-generator process can import it alone.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

# Indices into stat_fields(): the man page's field numbers (proc(5)) minus 3, since the list
# starts after pid and the command name.
PPID = 1  # field 4
UTIME, STIME = 11, 12  # fields 14 and 15, in clock ticks
START_TIME = 19  # field 22


def stat_fields(pid: int) -> list[str] | None:
    """The fields after the parenthesised command name (which may hold spaces or ")"), or
    None when the process is gone or cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def cpu_seconds(pids: Sequence[int]) -> float | None:
    """User + system CPU these processes have used so far; None if any cannot be read."""
    ticks = 0
    for pid in pids:
        fields = stat_fields(pid)
        if fields is None:
            return None
        ticks += int(fields[UTIME]) + int(fields[STIME])
    return ticks / os.sysconf("SC_CLK_TCK")
