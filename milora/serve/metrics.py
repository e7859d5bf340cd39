"""Prometheus metrics of one milora-serve app (its own registry: several apps may share a
process, as in tests).

Request counters and histograms are recorded by the HTTP layer; engine gauges (queue depth,
running rows, slots in use, KV, tokens/s) are read from the backend at scrape time, one
series per replica (a single server is replica "local"; on Ray, what each replica reported
with its latest answer).
"""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

UNKNOWN = "_unknown"  # label for requests naming no known model (keeps label values bounded)

_GAUGES = {  # stats key -> (metric name, help)
    "queued": ("milora_queue_depth", "requests waiting for admission to the batch"),
    "running": ("milora_running_rows", "rows in the running batch"),
    "slots_in_use": ("milora_slots_in_use", "adapter slots holding a tenant"),
    "slots_total": ("milora_slots_total", "adapter slots (slot 0, the base model, not counted)"),
    "kv_reserved_tokens": ("milora_kv_reserved_tokens", "KV tokens reserved by admitted requests"),
    "tokens_per_second": ("milora_tokens_per_second", "generated tokens per second over the last 10 s"),
    "tenant_refs": ("milora_tenant_refs", "tenant references held by running requests"),
    "tenant_loads": ("milora_tenant_loads", "tenants loaded into this replica so far (multiplexed loads on Ray)"),
}


class _EngineCollector:
    def __init__(self, stats: Callable[[], dict[str, dict[str, Any]]]):
        self._stats = stats

    def collect(self):
        per_replica = self._stats()
        families = {k: GaugeMetricFamily(name, doc, labels=["replica"]) for k, (name, doc) in _GAUGES.items()}
        loaded = GaugeMetricFamily("milora_tenant_loaded", "1 if the tenant holds an adapter slot on the replica",
                                   labels=["replica", "tenant"])
        info = GaugeMetricFamily("milora_replica_info", "a replica's process id", labels=["replica", "pid"])
        for replica, s in sorted(per_replica.items()):
            for key, fam in families.items():
                if key in s:
                    fam.add_metric([replica], float(s[key]))
            for tenant in s.get("loaded_tenants", {}):
                loaded.add_metric([replica, tenant], 1.0)
            if "pid" in s:
                info.add_metric([replica, str(s["pid"])], 1.0)
        yield from families.values()
        yield loaded
        yield info


class ServeMetrics:
    def __init__(self, stats: Callable[[], dict[str, dict[str, Any]]]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("milora_requests", "requests by model (tenant) and outcome",
                                ["tenant", "endpoint", "outcome"], registry=r)
        self.replica_requests = Counter("milora_replica_requests", "accepted requests by serving replica and tenant",
                                        ["replica", "tenant"], registry=r)
        self.completion_tokens = Counter("milora_completion_tokens", "generated tokens", ["tenant"], registry=r)
        self.prompt_tokens = Counter("milora_prompt_tokens", "prompt tokens", ["tenant"], registry=r)
        self.latency = Histogram("milora_request_seconds", "request latency, arrival to last token",
                                 ["endpoint"], registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.ttft = Histogram("milora_time_to_first_token_seconds", "arrival to first token", ["endpoint"],
                              registry=r, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.retries = Counter("milora_replica_retries", "requests re-sent after their replica died", registry=r)
        r.register(_EngineCollector(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)
