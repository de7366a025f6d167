"""A metrics listener that serves nothing: unit tests of WatchMetrics open no socket
(a fixed port would collide with whatever else listens there on the machine)."""

from __future__ import annotations

from typing import Any

from ctfix.platform.metrics import MetricsListener


class NoServer(MetricsListener):
    """Binds nothing, serves nothing, closes nothing."""

    def __init__(self) -> None:
        self.thread = None

    def serve(self, app: Any) -> None:
        del app

    def close(self) -> None:
        pass
