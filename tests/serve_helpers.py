"""A tiny export with a chat template, and milora-serve running in a thread on 127.0.0.1."""

from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
import time
from pathlib import Path

from export_helpers import make_model_dir
from runtime_helpers import add_word_tokenizer

TENANTS = ("alpha", "beta", "gamma", "delta")

# Word-level chat template for the tiny model: every word is one token of its vocabulary.
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}w20{% elif m['role'] == 'user' %}w21"
                 "{% else %}w22{% endif %} {{ m['content'] }} w23 {% endfor %}"
                 "{% if add_generation_prompt %}w22{% endif %}")

_CACHE: dict[str, tuple[Path, Path]] = {}


def tiny_chat_export(hidden: int = 32) -> tuple[Path, Path]:
    """(model_dir, out_dir): the runtime tests' tiny Llama with 4 tenants, a word-level tokenizer
    and a chat template; exported once per test process (read-only: copy it to modify it).
    hidden 32: portable graphs; 64 (head dim 16): the fused flavour."""
    key = f"tiny-{hidden}"
    if key not in _CACHE:
        from milora.export.exporter import export

        root = Path(tempfile.mkdtemp(prefix="milora-serve-tests-"))
        atexit.register(shutil.rmtree, root, True)
        model_dir = make_model_dir(root, hidden=hidden)
        add_word_tokenizer(model_dir)
        (model_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
        out_dir = root / "out"
        export(model_dir, out_dir, progress=False)
        _CACHE[key] = (model_dir, out_dir)
    return _CACHE[key]


class ServerThread:
    """uvicorn serving an app on 127.0.0.1 (a free port) in a background thread."""

    def __init__(self, app, timeout: float = 60.0):
        import uvicorn

        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def __enter__(self) -> "ServerThread":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02):
    """predicate()'s first truthy value, polling until timeout (then its last value)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
