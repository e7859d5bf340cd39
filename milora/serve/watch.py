"""milora-serve --watch DIR: adapters that appear in DIR become tenants, and leave when removed.

    DIR/NAME/                 an adapter directory (milora_config.json + milora_adapter.safetensors)
    DIR/NAME.safetensors      a slot pack written by milora-export

An entry is added once it has stayed unchanged for one scan, so a copy in progress is not read
half-written (or write it under a name starting with '.' and rename it: dot-names are ignored).
An entry that changes is reloaded; one that disappears is removed as soon as no running request
uses it. The directory is scanned every `interval` seconds (a plain scan works on every file
system, network mounts included).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from milora.errors import MiloraError

log = logging.getLogger("milora.serve")


def _signature(path: Path) -> tuple[int, int] | None:
    """(latest mtime, total size) of a file or of a directory's files; None if unreadable."""
    try:
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        stats = [p.stat() for p in files]
    except OSError:
        return None
    return (max((s.st_mtime_ns for s in stats), default=0), sum(s.st_size for s in stats))


def scan(directory: Path) -> dict[str, tuple[Path, tuple[int, int]]]:
    """Tenant name -> (source, signature) for the adapters in directory."""
    out = {}
    try:
        entries = list(directory.iterdir())
    except OSError as exc:
        log.warning("cannot read watched directory %s: %s", directory, exc)
        return out
    for p in entries:
        if p.name.startswith("."):
            continue
        if p.is_dir() and (p / "milora_config.json").is_file():
            name = p.name
        elif p.is_file() and p.suffix == ".safetensors":
            name = p.stem
        else:
            continue
        sig = _signature(p)
        if sig is not None:
            out[name] = (p, sig)
    return out


class TenantWatcher:
    def __init__(self, directory: str | Path, backend, interval: float = 2.0):
        """backend: a LocalBackend (add_tenant_now / remove_tenant_now / has_model)."""
        self.directory, self.backend, self.interval = Path(directory), backend, interval
        self.added: dict[str, tuple[int, int]] = {}  # tenants this watcher added -> signature loaded
        self._last: dict[str, tuple[int, int]] = {}
        self._refused: dict[str, tuple[int, int]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="milora-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.scan_once()
            except Exception:  # noqa: BLE001 - keep watching after an unexpected error
                log.exception("scanning %s failed", self.directory)
            self._stop.wait(self.interval)

    def scan_once(self) -> None:
        """One reconciliation: add stable new entries, reload changed ones, remove vanished ones."""
        seen = scan(self.directory)
        for name, (path, sig) in seen.items():
            stable = self._last.get(name) == sig
            if not stable or self.added.get(name) == sig or self._refused.get(name) == sig:
                continue
            if name in self.added:  # changed since it was loaded: reload
                if not self._remove(name):
                    continue
            elif self.backend.has_model(name):
                self._refuse(name, sig, "a tenant of that name is already registered (from the export or the "
                             "admin endpoint)")
                continue
            try:
                self.backend.add_tenant_now(name, path)
            except MiloraError as exc:
                self._refuse(name, sig, str(exc))
                continue
            self.added[name] = sig
            log.info("tenant %r added from %s", name, path)
        for name in [n for n in self.added if n not in seen]:
            self._remove(name)
        self._last = {n: s for n, (_, s) in seen.items()}

    def _remove(self, name: str) -> bool:
        if not self.backend.has_model(name):  # already removed (e.g. through the admin endpoint)
            del self.added[name]
            return True
        try:
            self.backend.remove_tenant_now(name)
        except MiloraError as exc:  # in use: retried at the next scan
            log.info("tenant %r not removed yet: %s", name, exc)
            return False
        del self.added[name]
        log.info("tenant %r removed (its adapter left %s)", name, self.directory)
        return True

    def _refuse(self, name: str, sig: tuple[int, int], why: str) -> None:
        self._refused[name] = sig
        log.warning("adapter %r in %s not added: %s", name, self.directory, why)
