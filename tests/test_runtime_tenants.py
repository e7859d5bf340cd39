"""Tenant registry: slots, LRU eviction of idle unpinned tenants, pinning, reference counts."""

import pytest

from milora.errors import TenantError
from milora.runtime.tenants import TenantRegistry


class Banks:
    """Stands in for the adapter banks: records which tenant each slot holds."""

    def __init__(self, n):
        self.slots = [None] * n
        self.loads = []

    def load(self, slot, name, source):
        assert slot != 0, "slot 0 is the base model and must never be assigned"
        self.slots[slot] = name
        self.loads.append(name)

    def unload(self, slot):
        self.slots[slot] = None


def make(n=3):
    banks = Banks(n)
    reg = TenantRegistry(n, banks.load, banks.unload)
    for name in "abcd":
        reg.add(name, f"pack-{name}")
    return reg, banks


def test_lru_eviction_of_idle_tenants():
    reg, banks = make(3)  # 2 usable slots
    sa = reg.acquire("a"); reg.release("a")
    sb = reg.acquire("b"); reg.release("b")
    assert {sa, sb} == {1, 2}
    reg.acquire("a"); reg.release("a")  # a is now the most recently used
    sc = reg.acquire("c")
    assert sc == sb and banks.slots[sc] == "c"  # b (least recent) was evicted
    assert reg.slots() == {"a": sa, "c": sc}


def test_in_use_tenant_is_never_evicted_and_overflow_is_an_error():
    reg, banks = make(3)
    reg.acquire("a"); reg.acquire("b")
    with pytest.raises(TenantError, match="pinned or in-use"):
        reg.acquire("c")
    assert banks.slots[1:] == ["a", "b"]  # nothing was evicted
    reg.release("b")
    assert reg.acquire("c") == 2 and reg.slots().get("b") is None


def test_pinned_tenant_stays_resident():
    reg, banks = make(3)
    reg.pin("a")
    reg.acquire("b"); reg.release("b")
    reg.acquire("c"); reg.release("c")  # evicts b, not the pinned a
    reg.acquire("d"); reg.release("d")  # evicts c
    assert "a" in reg.slots() and banks.loads.count("a") == 1
    reg.unpin("a")
    reg.acquire("b")  # a is now the LRU idle tenant
    assert "a" not in reg.slots()


def test_refcounts_and_removal():
    reg, _ = make(3)
    reg.acquire("a"); reg.acquire("a")
    assert reg.refs("a") == 2
    with pytest.raises(TenantError, match="in use by 2"):
        reg.remove("a")
    reg.release("a"); reg.release("a")
    with pytest.raises(TenantError, match="holds no reference"):
        reg.release("a")
    reg.remove("a")
    assert "a" not in reg and reg.in_use() == 0


def test_unknown_tenant_lists_known_ones():
    reg, _ = make(3)
    with pytest.raises(TenantError, match="unknown tenant 'zz'.*a, b, c, d"):
        reg.acquire("zz")


def test_base_only_export_has_no_tenant_slot():
    banks = Banks(1)
    reg = TenantRegistry(1, banks.load, banks.unload)  # an export without adapters
    reg.add("a", "pack-a")
    with pytest.raises(TenantError, match="no adapter slots.*--slots"):
        reg.acquire("a")
