"""The I/O layer (``mlora_export.io``): the strict JSON reader and writer, the streaming engine's
pieces, and the one module-parallel helper (``threads.map_modules``)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mlora_export.errors import ConfigError
from mlora_export.io.jsonio import JsonFault, dumps, loads, parse_json, read_json, write_json
from mlora_export.io.streaming import BufferPool, MappedRegion, ShortReadError, in_file, lookahead, pread
from mlora_export.threads import map_modules


@pytest.mark.parametrize("text, kind, words", [
    ('{"a": 1, "a": 2}', "duplicate", "the key 'a' appears twice"),
    ('{"a": NaN}', "value", "NaN is not a JSON number"),
    ('{"a": -Infinity}', "value", "-Infinity is not a JSON number"),
    ('{"a": 1e400}', "value", "the number 1e400 is beyond the range of a float"),
    ('{"a": ' + "1" * 5000 + "}", "value", "Exceeds the limit"),
    ("[" * 100_000, "depth", "nested too deeply"),
    ('{"a" 1}', "syntax", "Expecting ':' delimiter"),
    (b"\xff\xfe", "encoding", "not UTF-8 text"),
])
def test_strict_reader_refuses_what_json_lets_pass(text: str | bytes, kind: str, words: str) -> None:
    with pytest.raises(JsonFault) as e:
        loads(text)
    assert e.value.kind == kind and words in str(e.value)
    with pytest.raises(ConfigError, match="^x.json: "):  # the file's reader words it in the caller's error type
        parse_json(text, "x.json", ConfigError)


def test_strict_reader_reads_json() -> None:
    assert loads('{"a": [1, 2.5, "é", null, true], "b": {"c": 1e300}}') == {"a": [1, 2.5, "é", None, True], "b": {"c": 1e300}}
    assert loads(b'{"k": "v"}') == {"k": "v"}
    with pytest.raises(ConfigError, match=r"x.json: not valid JSON \(Expecting value at line 2\)"):
        parse_json('{"a":\n}', "x.json", ConfigError)


def test_writer_writes_our_form_and_refuses_nan(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    write_json(path, {"b": 1, "a": [1.5, "é"]})
    assert path.read_text(encoding="utf-8") == '{\n  "b": 1,\n  "a": [\n    1.5,\n    "\\u00e9"\n  ]\n}\n'
    assert dumps({"b": 1, "a": "é"}, sort_keys=True, ensure_ascii=False) == '{\n  "a": "é",\n  "b": 1\n}\n'
    with pytest.raises(ValueError, match="Out of range float values"):
        write_json(tmp_path / "nan.json", {"loss": float("nan")})
    assert not (tmp_path / "nan.json").exists()  # refused before the file is opened
    assert dumps({"loss": float("nan")}, allow_nan=True) == '{\n  "loss": NaN\n}\n'
    assert read_json(path, ConfigError) == {"b": 1, "a": [1.5, "é"]}
    with pytest.raises(ConfigError, match="is a folder"):
        read_json(tmp_path, ConfigError)


def test_map_modules_keeps_the_order_and_reports_the_weights() -> None:
    seen: list[tuple[int, int]] = []
    lock = threading.Lock()

    def progress(done: int, total: int) -> None:
        with lock:
            seen.append((done, total))

    items = list(range(1, 11))
    assert map_modules(lambda i, x: (i, x * x), items, 3, progress, weight=lambda x: x) == [(i, x * x) for i, x in enumerate(items)]
    assert sorted(seen)[-1] == (55, 55) and len(seen) == 10 and [d for d, _ in sorted(seen)] == sorted({d for d, _ in seen})
    assert map_modules(lambda i, x: x, [], 4) == []


def test_map_modules_raises_the_first_failure_in_order_and_stops() -> None:
    """Items are handed out in order: when item 2 fails late and item 5 early, item 2's error is
    raised, and no thread starts an item after a failure."""
    started: list[int] = []

    def work(i: int, x: int) -> int:
        started.append(i)
        if i == 2:
            time.sleep(0.2)
            raise ValueError("item 2")
        if i == 5:
            raise KeyError("item 5")
        time.sleep(0.05)
        return x

    with pytest.raises(ValueError, match="item 2"):
        map_modules(work, list(range(40)), 4)
    assert len(started) < 40  # the threads stopped instead of working through the list


def test_streaming_reads_and_short_files(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(range(256)) * 64)
    pool = BufferPool()
    got = in_file(path, lambda fd: bytes(pread(fd, 100, 4000, pool)))
    assert got == (bytes(range(256)) * 64)[4000:4100]
    region = in_file(path, lambda fd: MappedRegion(fd, 300, 5000))  # the map outlives the descriptor
    assert bytes(region.view) == (bytes(range(256)) * 64)[5000:5300]
    region.close()
    with pytest.raises(ShortReadError) as e:
        in_file(path, lambda fd: pread(fd, 100, os.path.getsize(path) - 10, pool))
    assert e.value.offset == os.path.getsize(path)
    with pytest.raises(ShortReadError):
        in_file(path, lambda fd: MappedRegion(fd, 100, os.path.getsize(path) - 10))
    buf = pool.get(10_000, phase=123)
    assert buf.ctypes.data % 4096 == 123 and buf.nbytes == 10_000


def test_lookahead_yields_in_order_and_cancels_when_stopped_early() -> None:
    ran: list[int] = []

    def job(i: int) -> Callable[[], int]:
        def run() -> int:
            time.sleep(0.01 * (5 - i % 5))
            ran.append(i)
            return i
        return run

    with ThreadPoolExecutor(3) as pool:
        assert list(lookahead(pool, (job(i) for i in range(12)), 4)) == list(range(12))
        ran.clear()
        stream = lookahead(pool, (job(i) for i in range(100)), 2)
        assert [next(stream), next(stream)] == [0, 1]
        stream.close()  # queued jobs are cancelled, running ones waited for
    assert len(ran) <= 6
