"""The video stage's encoder feed: frames reach the writer in order from its own thread, and failures
come back to the stage instead of hanging it."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from stages.video import FrameSink, _to_uint8


class RecordingWriter:
    def __init__(self, fail_at: int | None = None, fail_close: bool = False) -> None:
        self.frames: list[np.ndarray] = []
        self.closed = 0
        self.threads: set[str] = set()
        self.fail_at, self.fail_close = fail_at, fail_close

    def append_data(self, frame: np.ndarray) -> None:
        self.threads.add(threading.current_thread().name)
        if self.fail_at is not None and len(self.frames) == self.fail_at:
            raise OSError(28, "No space left on device")
        self.frames.append(frame.copy())

    def close(self) -> None:
        self.closed += 1
        if self.fail_close:
            raise RuntimeError("ffmpeg exited with code 1")


def chunks(n: int, per: int = 3) -> list[np.ndarray]:
    frames = np.arange(n * 2 * 2 * 3, dtype=np.uint8).reshape(n, 2, 2, 3)
    return [frames[i : i + per] for i in range(0, n, per)]


def test_frames_arrive_in_order_from_another_thread_and_the_writer_is_closed_once() -> None:
    writer = RecordingWriter()
    sink = FrameSink(writer, depth=1)
    for c in chunks(10):
        sink.put(c)
    sink.end()
    assert sink.wait() is None
    assert np.array_equal(np.stack(writer.frames), np.concatenate(chunks(10)))
    assert writer.closed == 1
    assert writer.threads == {"frame-sink"}


def test_a_failing_writer_is_reported_and_never_blocks_the_stage() -> None:
    writer = RecordingWriter(fail_at=4)
    sink = FrameSink(writer, depth=1)
    with pytest.raises(OSError, match="No space"):
        for c in chunks(30):  # far more chunks than the queue holds: `put` must not hang once the writer died
            sink.put(c)
        sink.end()
        raise AssertionError(sink.wait())
    sink.end()
    assert isinstance(sink.wait(), OSError)
    assert writer.closed == 1 and len(writer.frames) == 4


def test_a_failing_close_is_reported() -> None:
    sink = FrameSink(RecordingWriter(fail_close=True))
    sink.put(chunks(3)[0])
    sink.end()
    assert isinstance(sink.wait(), RuntimeError)


def test_frame_bytes_match_the_float_formula() -> None:
    img = torch.rand(3, 3, 16, 16) * 1.4 - 0.2  # out of range on both sides: clamped
    expected = (img.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(_to_uint8(img), expected)
