"""What the HTTP layer serves from: a Backend. LocalBackend is one Engine in this process,
driven by an EngineDriver; milora.serve.ray_serve.RayBackend forwards to Ray Serve replicas.

A backend's generate() returns a Generation: async-iterate it for Deltas, cancel() it at any
time; prompt_tokens and replica (which process serves it) are known once it is accepted.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
from pathlib import Path
from typing import Any, AsyncIterator, Protocol

from milora.errors import TenantError
from milora.runtime.engine import Engine
from milora.serve.driver import Delta, EngineDriver, GenerateCall

TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class Generation(Protocol):
    prompt_tokens: int
    replica: str

    def __aiter__(self) -> AsyncIterator[Delta]: ...

    def cancel(self) -> None: ...


def check_tenant_name(name: Any, base_model_id: str) -> str:
    if not isinstance(name, str) or not TENANT_NAME.match(name):
        raise TenantError(f"tenant name {name!r:.80} is invalid; expected 1-128 characters of letters, digits, "
                          "'.', '_' or '-', starting with a letter or digit")
    if name == base_model_id:
        raise TenantError(f"tenant name {name!r} is the base model's id on this server; choose another name")
    return name


def adapter_kind(path: Path) -> str:
    """'adapter' (a MiLoRA / format-v1 adapter directory) or 'pack' (a slot pack .safetensors)."""
    if path.is_dir():
        return "adapter"
    if path.is_file() and path.suffix == ".safetensors":
        return "pack"
    raise TenantError(f"adapter source {path} is neither an adapter directory nor a slot pack (.safetensors); "
                      "give a directory written by save_adapter / milora-import or a pack written by milora-export")


class Backend:
    """Interface of what serves the HTTP API (see LocalBackend)."""

    admin_supported = True

    def __init__(self, base_model_id: str = "base"):
        self.base_model_id = base_model_id

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def ready(self) -> tuple[bool, str]:
        return True, "ready"

    def model_ids(self) -> list[str]:
        raise NotImplementedError

    def has_model(self, name: str) -> bool:
        return name in self.model_ids()

    async def generate(self, call: GenerateCall) -> Generation:
        raise NotImplementedError

    def stats(self) -> dict[str, dict[str, Any]]:
        """Engine gauges per replica (may block: call it off the event loop)."""
        return {}

    async def add_tenant(self, name: str, source: str, pin: bool = False) -> None:
        raise NotImplementedError

    async def remove_tenant(self, name: str) -> None:
        raise NotImplementedError


class LocalBackend(Backend):
    """One Engine over OUT_DIR in this process, stepped by one background thread."""

    def __init__(self, out_dir: str | Path | None = None, *, engine: Engine | None = None,
                 base_model_id: str = "base", default_max_tokens: int = 256, **engine_options):
        super().__init__(base_model_id)
        self.engine = engine if engine is not None else Engine(out_dir, **engine_options)
        self.driver = EngineDriver(self.engine, default_max_tokens)
        self._names_lock = threading.Lock()
        self._names = set(self.engine.tenants.names())
        if base_model_id in self._names:
            raise TenantError(f"this export has a tenant named {base_model_id!r}, the id the server gives the bare "
                              "base model; choose another base model id (--base-model-id)")
        self.replica_id = "local"

    async def start(self) -> None:
        self.driver.start()

    async def close(self) -> None:
        await asyncio.to_thread(self.driver.close)

    def ready(self) -> tuple[bool, str]:
        return (True, "ready") if self.driver.alive else (False, "the engine thread is not running")

    def model_ids(self) -> list[str]:
        with self._names_lock:
            return sorted(self._names)

    def has_model(self, name: str) -> bool:
        with self._names_lock:
            return name in self._names

    async def generate(self, call: GenerateCall) -> Generation:
        stream = await self.driver.submit(call)
        stream.replica = self.replica_id
        return stream

    def stats(self) -> dict[str, dict[str, Any]]:
        if not self.driver.alive:
            return {}
        s = self.driver.stats()
        s["slots_in_use"] = len(s["loaded_tenants"])
        s["pid"] = os.getpid()
        return {self.replica_id: s}

    # ---- tenants at run time (admin endpoint, watched directory) ----

    def add_tenant_now(self, name: str, source: str | Path, pin: bool = False) -> None:
        """Register a tenant from an adapter directory or a slot pack (Engine.add_tenant reads and
        checks either now: shapes, base, finite values)."""
        check_tenant_name(name, self.base_model_id)
        path = Path(source)
        with self._names_lock:
            if name in self._names:
                raise TenantError(f"tenant {name!r} is already registered; remove it first to replace it")
            self.engine.add_tenant(name, path, pin=pin)
            self._names.add(name)

    def remove_tenant_now(self, name: str) -> None:
        with self._names_lock:
            self.engine.remove_tenant(name)
            self._names.discard(name)

    async def add_tenant(self, name: str, source: str, pin: bool = False) -> None:
        await asyncio.to_thread(self.add_tenant_now, name, source, pin)

    async def remove_tenant(self, name: str) -> None:
        await asyncio.to_thread(self.remove_tenant_now, name)
