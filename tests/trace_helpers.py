"""Helpers shared by the tracing tests."""

from __future__ import annotations

import threading
import time

from mldbg_callbacks.core.trace_core import TraceCore
from mldbg_callbacks.store.local import RunWriter


def barrier(core: TraceCore, timeout: float = 10.0) -> None:
    """Wait until the worker has handled everything queued so far (a flush that matches no partition)."""
    if core._worker is None:
        return
    done = threading.Event()
    core._put(("flush", -1, done))
    assert done.wait(timeout), "tracing worker did not answer"


def failing_part_writes(monkeypatch) -> dict:
    """Make every Parquet part write fail with an I/O error until ``state["fail"] = False``."""
    real = RunWriter.write_part
    state = {"fail": True}

    def flaky_write_part(self, *args, **kwargs):
        if state["fail"]:
            raise OSError(5, "I/O error")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(RunWriter, "write_part", flaky_write_part)
    return state


class ThrottledSink(RunWriter):
    """A real LocalStore writer whose part writes take at least ``delay`` seconds: a store slower than training."""

    delay = 0.03

    def write_part(self, *args, **kwargs):
        time.sleep(self.delay)
        return super().write_part(*args, **kwargs)
