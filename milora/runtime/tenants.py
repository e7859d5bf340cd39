"""Tenant registry: which tenant occupies which adapter slot.

Slots 1..S-1 hold tenants (slot 0 is the all-zero base model and is never assigned).
A tenant in use by a request holds a reference and is never evicted; idle unpinned tenants
are evicted least-recently-used first when a slot is needed; if every slot is pinned or in
use, acquire() raises TenantError at once (the caller decides whether to wait).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from milora.errors import TenantError


@dataclass
class _Tenant:
    source: Any  # what the loader needs (a pack path, an adapter directory...)
    slot: int | None = None
    refs: int = 0
    pinned: bool = False
    last_used: int = 0


class TenantRegistry:
    def __init__(self, num_slots: int, load: Callable[[int, str, Any], None], unload: Callable[[int], None]):
        """load(slot, name, source) writes a tenant's adapter into a slot; unload(slot) clears it."""
        if num_slots < 1:
            raise TenantError(f"need at least 1 slot (slot 0, the base model), got {num_slots}")
        self.num_slots = num_slots
        self._load, self._unload = load, unload
        self._tenants: dict[str, _Tenant] = {}
        self._clock = 0

    # ---- membership ----

    def add(self, name: str, source: Any, pin: bool = False) -> None:
        if name in self._tenants:
            raise TenantError(f"tenant {name!r} is already registered; remove it first to replace it")
        self._tenants[name] = _Tenant(source)
        if pin:
            self.pin(name)

    def remove(self, name: str) -> None:
        t = self._get(name)
        if t.refs:
            raise TenantError(f"tenant {name!r} is in use by {t.refs} request(s); cancel or finish them first")
        if t.slot is not None:
            self._unload(t.slot)
        del self._tenants[name]

    def pin(self, name: str) -> int:
        """Keep a tenant resident (loaded now if needed) until unpinned."""
        t = self._get(name)
        slot = self._ensure_loaded(name, t)
        t.pinned = True
        return slot

    def unpin(self, name: str) -> None:
        self._get(name).pinned = False

    # ---- use by requests ----

    def acquire(self, name: str) -> int:
        """Slot of a tenant for a new request (loading it, evicting an idle one if needed)."""
        t = self._get(name)
        slot = self._ensure_loaded(name, t)
        t.refs += 1
        return slot

    def release(self, name: str) -> None:
        t = self._tenants.get(name)
        if t is None or t.refs == 0:
            raise TenantError(f"release of tenant {name!r} that holds no reference")
        t.refs -= 1

    # ---- inspection ----

    def __contains__(self, name: str) -> bool:
        return name in self._tenants

    def names(self) -> list[str]:
        return sorted(self._tenants)

    def slots(self) -> dict[str, int]:
        """Loaded tenants and their slots."""
        return {n: t.slot for n, t in self._tenants.items() if t.slot is not None}

    def refs(self, name: str) -> int:
        return self._get(name).refs

    def in_use(self) -> int:
        return sum(t.refs for t in self._tenants.values())

    # ---- internals ----

    def _get(self, name: str) -> _Tenant:
        t = self._tenants.get(name)
        if t is None:
            known = ", ".join(sorted(self._tenants)) or "none"
            raise TenantError(f"unknown tenant {name!r}; registered tenants: {known}")
        return t

    def _ensure_loaded(self, name: str, t: _Tenant) -> int:
        self._clock += 1
        t.last_used = self._clock
        if t.slot is not None:
            return t.slot
        slot = self._free_slot()
        self._load(slot, name, t.source)
        t.slot = slot
        return slot

    def _free_slot(self) -> int:
        used = {t.slot for t in self._tenants.values() if t.slot is not None}
        for s in range(1, self.num_slots):
            if s not in used:
                return s
        if self.num_slots == 1:
            raise TenantError("this export has no adapter slots (it was exported without adapters); re-export "
                              "with --slots N to serve tenants")
        idle = [t for t in self._tenants.values() if t.slot is not None and t.refs == 0 and not t.pinned]
        if not idle:
            raise TenantError(
                f"all {self.num_slots - 1} adapter slots hold pinned or in-use tenants; unpin a tenant, "
                "wait for requests to finish, or open the runtime with more slots (re-export with --slots)"
            )
        victim = min(idle, key=lambda t: t.last_used)
        slot, victim.slot = victim.slot, None
        self._unload(slot)
        return slot
