"""The access log: one JSON line per call, written by the process's one sink.

The sink is per process: `GMESH_ACCESS_LOG` (a file path, or `-` for stderr, the default)
or `gmesh proxy --access-log`. Which calls are logged is config: the `Telemetry` kind's
`accessLog` (off by default; a sample share and request headers to include, per service).
Lines are built only for logged calls. A file is written through a 64 KiB buffer flushed
every second (and at exit), so logging a call costs a `json.dumps` and a memory copy, never
a disk wait on the event loop.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import sys
import threading
import time
from typing import IO, Any

ENV = "GMESH_ACCESS_LOG"


class AccessLogSink:
    """Where access log lines go: stderr, or a file flushed every second."""

    FLUSH_INTERVAL = 1.0

    def __init__(self, target: str = "-") -> None:
        self.target = target
        self.lines = 0
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._out: IO[str]
        if target in ("", "-"):
            self._out = sys.stderr
            self._file = False
        else:
            self._out = open(target, "a", buffering=1 << 16, encoding="utf-8")  # noqa: SIM115
            self._file = True
            atexit.register(self.close)

    def write(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, separators=(",", ":"), default=str) + "\n"
        with self._lock:
            self._out.write(line)
            self.lines += 1
            if self._file and self._timer is None:
                self._timer = threading.Timer(self.FLUSH_INTERVAL, self.flush)
                self._timer.daemon = True
                self._timer.start()

    def flush(self) -> None:
        with self._lock:
            self._timer = None
            with contextlib.suppress(ValueError, OSError):
                self._out.flush()

    def close(self) -> None:
        self.flush()
        if self._file:
            with contextlib.suppress(ValueError, OSError):
                self._out.close()


_sink: AccessLogSink | None = None


def sink() -> AccessLogSink:
    """The process's sink, opened on first use from `GMESH_ACCESS_LOG` (default: stderr)."""
    global _sink
    if _sink is None:
        _sink = AccessLogSink(os.environ.get(ENV, "-"))
    return _sink


def configure(target: str) -> AccessLogSink:
    """Send the access log of this process to `target` (a path, or `-` for stderr)."""
    global _sink
    if _sink is not None and _sink.target != target:
        _sink.close()
        _sink = None
    if _sink is None:
        _sink = AccessLogSink(target)
    return _sink


def timestamp(now: float | None = None) -> str:
    """RFC 3339 UTC with milliseconds: `2026-11-29T08:15:02.123Z`."""
    now = time.time() if now is None else now
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
