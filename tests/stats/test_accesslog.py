"""The access log sink without the data path: whole lines, shared files, flush and close."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from gmesh.stats.accesslog import AccessLogSink, timestamp


def test_lines_from_two_sinks_on_one_file_never_interleave(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    # two workers of one proxy, each with its own sink on the same file, writing at once
    sinks = [AccessLogSink(str(path)) for _ in range(2)]
    big = "x" * 3000  # lines longer than a pipe's atomic size: whole anyway, one write per batch

    def write(sink: AccessLogSink, worker: int) -> None:
        for i in range(2000):
            sink.write({"worker": worker, "i": i, "pad": big})

    threads = [threading.Thread(target=write, args=(s, n)) for n, s in enumerate(sinks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for sink in sinks:
        sink.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 4000 == sum(s.lines for s in sinks)
    entries = [json.loads(line) for line in lines]  # every line whole JSON
    for worker in (0, 1):
        assert [e["i"] for e in entries if e["worker"] == worker] == list(range(2000))  # in order
    assert all(s.dropped == 0 for s in sinks)


def test_flush_waits_for_what_was_written(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    sink = AccessLogSink(str(path))
    sink.write({"n": 1})
    sink.flush()
    assert json.loads(path.read_text()) == {"n": 1}
    sink.close()
    sink.close()  # twice is fine


def test_timestamps_are_rfc3339_utc_with_milliseconds() -> None:
    assert timestamp(0.0) == "1970-01-01T00:00:00.000Z"
    assert timestamp(1_700_000_000.25) == "2023-11-14T22:13:20.250Z"
