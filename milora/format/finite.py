"""The one finiteness check of adapter tensors (numpy only: the runtime uses it too).

A NaN or an infinity anywhere in an adapter (LoRA A/B, router weights, pooler, activation
coefficients, noise weights) or in a slot pack makes the tenant's outputs NaN or its routing
arbitrary, and in a batched graph it can reach other rows through 0 * inf. Every reader calls
check_finite: the format-v1 reader (adapter_format.read_adapter), the PEFT and reference-code
importers, the exporter (packs as built, after scaling and the dtype cast), the slot pack
reader (export.banks.load_pack) and the runtime (Engine.add_tenant, slot loads).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from milora.errors import NonFiniteError

_SHOWN = 6  # tensors named in one message


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor (duck-typed: this module never imports torch)
        value = value.detach().float().cpu().numpy()
    return np.asarray(value)


def non_finite_counts(value: Any) -> tuple[int, int, int]:
    """(NaN, +inf, -inf) counts of one array or tensor; integer arrays are always finite."""
    arr = _as_numpy(value)
    if arr.dtype.kind not in "fc" or bool(np.isfinite(arr).all()):
        return 0, 0, 0
    return int(np.isnan(arr).sum()), int(np.isposinf(arr).sum()), int(np.isneginf(arr).sum())


def check_finite(tensors: Mapping[str, Any], where: str, fix: str | None = None) -> None:
    """Raise NonFiniteError naming every tensor of `tensors` that holds NaN or +-inf, with its
    NaN / +inf / -inf counts. `where` says whose tensors they are (tenant, file)."""
    problems = []
    for name, value in tensors.items():
        nan, pos, neg = non_finite_counts(value)
        if nan or pos or neg:
            problems.append((name, nan, pos, neg, int(_as_numpy(value).size)))
    if not problems:
        return
    shown = "; ".join(f"{n}: {nan + pos + neg} of {size} values (NaN {nan}, +inf {pos}, -inf {neg})"
                      for n, nan, pos, neg, size in problems[:_SHOWN])
    more = f"; and {len(problems) - _SHOWN} more tensor(s)" if len(problems) > _SHOWN else ""
    raise NonFiniteError(
        f"{where} holds non-finite values in {len(problems)} tensor(s): {shown}{more}; expected finite numbers "
        f"everywhere. Fix: {fix or 'retrain the adapter (or take an earlier checkpoint) from a run whose loss stayed finite'}",
        problems,
    )
