"""TensorBoard scalars for training runs, written without TensorFlow when ``tensorboard`` is installed.

``metrics.jsonl`` stays the record of a run; this mirrors its numeric fields into
``workdir/tensorboard`` for ``tensorboard --logdir runs/``. Without the ``tensorboard`` package
(``pip install tensorboard``) nothing is written.

Example:
  >>> import tempfile
  >>> with tempfile.TemporaryDirectory() as d:
  ...     writer = ScalarWriter.create(d)
  ...     if writer is not None:
  ...         writer.write({"step": 10, "loss": 0.5})
  ...         writer.close()
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class ScalarWriter:
    """Writes numeric entries of metric records as TensorBoard scalar events (tag = key).

    Construct with ``ScalarWriter.create(logdir)`` (None without the ``tensorboard`` package).

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as d:
      ...     w = ScalarWriter.create(d)
      ...     _ = w is None or (w.write({"step": 3, "loss": 1.5}), w.close())
    """

    def __init__(self, logdir: str | os.PathLike):
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event, self._summary = Event, Summary
        Path(logdir).mkdir(parents=True, exist_ok=True)
        self._writer = EventFileWriter(os.fspath(logdir))

    @classmethod
    def create(cls, logdir: str | os.PathLike) -> ScalarWriter | None:
        """A writer for ``logdir``, or None when the ``tensorboard`` package is not installed.

        Args:
          logdir: folder of the event files (created).

        Returns:
          The writer, or None.

        Example:
          >>> import tempfile
          >>> with tempfile.TemporaryDirectory() as d:
          ...     w = ScalarWriter.create(d)
          ...     _ = w is None or w.close()
        """
        try:
            return cls(logdir)
        except ImportError:
            return None

    def write(self, record: Mapping[str, Any]) -> None:
        """Writes every finite int/float of ``record`` except ``step`` at ``record['step']``.

        Args:
          record: one metrics.jsonl entry (``step`` required).

        Example:
          >>> import tempfile
          >>> with tempfile.TemporaryDirectory() as d:
          ...     w = ScalarWriter.create(d)
          ...     _ = w is None or (w.write({"step": 1, "accuracy": 0.25}), w.close())
        """
        values = [
            self._summary.Value(tag=k, simple_value=float(v))
            for k, v in record.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
        ]
        event = self._event(
            wall_time=time.time(), step=int(record["step"]), summary=self._summary(value=values)
        )
        self._writer.add_event(event)

    def close(self) -> None:
        """Flushes and closes the event file.

        Example:
          >>> import tempfile
          >>> with tempfile.TemporaryDirectory() as d:
          ...     w = ScalarWriter.create(d)
          ...     _ = w is None or w.close()
        """
        self._writer.flush()
        self._writer.close()
