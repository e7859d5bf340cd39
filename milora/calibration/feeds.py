"""onnxruntime sessions for milora-quantize's graph runs; the feeds themselves are
milora.format.feeds (shared with the export's validation)."""

from __future__ import annotations

from typing import Any


def session(model_or_path: Any, threads: int | None = None):
    """A CPU onnxruntime session over a path or a serialized model (bytes)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(model_or_path if isinstance(model_or_path, bytes) else str(model_or_path),
                                sess_options=opts, providers=["CPUExecutionProvider"])
