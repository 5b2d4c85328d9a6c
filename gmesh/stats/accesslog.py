"""The access log: one JSON line per call, written by the process's one sink.

The sink is per process: `GMESH_ACCESS_LOG` (a file path, or `-` for stderr, the default)
or `gmesh proxy --access-log`. Which calls are logged is config: the `Telemetry` kind's
`accessLog` (off by default; a sample share and request headers to include, per service).
Lines are built only for logged calls, on the event loop; a writer thread writes them (whole
lines, O_APPEND), so logging a call costs a `json.dumps` and a queue put, never a disk or pipe
wait on the event loop; a queue of 10,000 lines bounds what a stalled disk can hold back.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import queue
import sys
import threading
import time
from typing import Any

ENV = "GMESH_ACCESS_LOG"


class AccessLogSink:
    """Where access log lines go: stderr or a file, written by a thread of its own.

    The event loop only builds a line and puts it on a bounded queue; the writer thread takes
    every line waiting and writes them whole in one `os.write` on a descriptor opened with
    O_APPEND, so workers of one proxy sharing a file never interleave inside a line. When the
    disk or the pipe falls behind by `QUEUE` lines, further lines are dropped and counted
    (`dropped`), never waited for."""

    QUEUE = 10_000

    def __init__(self, target: str = "-") -> None:
        self.target = target
        self.lines = 0
        self.dropped = 0
        self._queue: queue.Queue[bytes | None] = queue.Queue(self.QUEUE)
        if target in ("", "-"):
            self._fd = sys.stderr.fileno()
            self._own = False
        else:
            self._fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self._own = True
        self._thread = threading.Thread(target=self._write_lines, name="gmesh-access-log", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def write(self, entry: dict[str, Any]) -> None:
        line = (json.dumps(entry, separators=(",", ":"), default=str) + "\n").encode()
        try:
            self._queue.put_nowait(line)
            self.lines += 1
        except queue.Full:
            self.dropped += 1

    def _write_lines(self) -> None:
        while True:
            first = self._queue.get()
            batch = [first]
            while len(batch) < 512:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = None in batch
            data = b"".join(line for line in batch if line is not None)
            try:
                while data:
                    data = data[os.write(self._fd, data) :]
            except OSError:
                self.dropped += 1
            for _ in batch:
                self._queue.task_done()
            if stop:
                return

    def flush(self, timeout: float = 5.0) -> None:
        """Wait (at most `timeout` seconds) until every line queued so far is written."""
        done = threading.Event()

        def wait() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=wait, daemon=True).start()
        done.wait(timeout)

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self.flush()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        self._thread.join(timeout=5)
        if self._own:
            with contextlib.suppress(OSError):
                os.close(self._fd)


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
