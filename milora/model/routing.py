"""Routing state as explicit data, and the call-scoped session that carries it through one
forward (or one generate call) of a Hugging Face model.

Shape legend: B batch rows, T tokens, L decoder layers, E = 7 experts (contract.EXPERTS).

A prefill forward computes the routing from the prompt (route mode) and returns a
RoutingState; every later forward of the same requests takes it as input (apply mode) and
runs no router. Nothing is kept on modules: a RoutingSession lives in a context variable
for the duration of one MiloraModel.forward / generate call and is gone afterwards.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor

from milora.format.contract import EXPERTS, NUM_EXPERTS
from milora.errors import RoutingError


@dataclass(frozen=True)
class RoutingState:
    """gates [B, L, 7] float32: the canonical routing. gates[b, l, m] multiplies expert m's LoRA
    update in layer l for row b; 0 means off. A routed tenant's row has exactly its k non-zeros
    per layer; a non-routed tenant's row carries its fixed gates."""

    gates: Tensor

    def __post_init__(self) -> None:
        g = self.gates
        if g.dim() != 3 or g.shape[-1] != NUM_EXPERTS:
            raise RoutingError(f"RoutingState.gates must be [B, L, {NUM_EXPERTS}], got {tuple(g.shape)}")
        if g.dtype != torch.float32:
            object.__setattr__(self, "gates", g.float())

    @property
    def batch_size(self) -> int:
        return self.gates.shape[0]

    @property
    def num_layers(self) -> int:
        return self.gates.shape[1]

    def active(self) -> Tensor:
        """[B, L, 7] bool: which experts are on (derived from gates)."""
        return self.gates != 0

    def experts(self, row: int, layer: int) -> list[str]:
        """Names of the experts on for one row and layer, in expert order."""
        return [EXPERTS[m] for m in self.active()[row, layer].nonzero().flatten().tolist()]

    def select(self, rows: Tensor | list[int]) -> "RoutingState":
        return RoutingState(self.gates[torch.as_tensor(rows, dtype=torch.long)])

    def repeat_interleave(self, n: int) -> "RoutingState":
        """Each row repeated n times in place: the expansion HF generate applies for beams and
        num_return_sequences, so row b's copies keep prompt b's routing."""
        return RoutingState(self.gates.repeat_interleave(n, dim=0))

    def to(self, device: torch.device | str) -> "RoutingState":
        return RoutingState(self.gates.to(device))

    @staticmethod
    def concat(states: list["RoutingState"]) -> "RoutingState":
        return RoutingState(torch.cat([s.gates for s in states], dim=0))


@dataclass
class ForwardRouting:
    """What one forward of the HF model needs and produces. Route mode: `mask` [B, T] bool
    selects the prompt tokens, routers fill `layer_gates` and `layer_probs`. Apply mode:
    `given` [B, L, 7] is read."""

    mask: Tensor | None = None
    given: Tensor | None = None
    layer_gates: dict[int, Tensor] = field(default_factory=dict)  # l -> [B, 7]
    layer_probs: dict[int, Tensor] = field(default_factory=dict)  # l -> [B, E]

    @property
    def routing(self) -> bool:
        return self.given is None

    def gate(self, layer: int, expert: int) -> Tensor:
        """[B] gates of one (layer, expert) for every row."""
        if self.given is not None:
            return self.given[:, layer, expert]
        if layer not in self.layer_gates:
            raise RoutingError(f"layer {layer} has no routing yet (its router did not run)")
        return self.layer_gates[layer][:, expert]


class RoutingSession:
    """Routing for one MiloraModel call. The first forward routes unless `state` was given;
    every later forward (decode steps of generate) applies the recorded state."""

    def __init__(self, state: RoutingState | None = None, routing_mask: Tensor | None = None):
        self.state = state
        self.routing_mask = routing_mask
        self.current: ForwardRouting | None = None
        self.lb_probs: list[Tensor] | None = None  # per layer [B, E] from the routing forward

    def begin(self, batch_size: int, attention_mask: Tensor | None, seq_len: int, device) -> ForwardRouting:
        if self.state is None:
            mask = self.routing_mask if self.routing_mask is not None else attention_mask
            if mask is None:
                mask = torch.ones(batch_size, seq_len, dtype=torch.bool, device=device)
            mask = mask.bool()[:, -seq_len:]
            self.current = ForwardRouting(mask=mask)
        else:
            gates = self.state.gates.to(device)
            if gates.shape[0] != batch_size:
                if batch_size % gates.shape[0]:
                    raise RoutingError(
                        f"routing state has {gates.shape[0]} rows but the batch has {batch_size}; "
                        "expected equal, or a multiple (rows expanded for beams)"
                    )
                gates = gates.repeat_interleave(batch_size // gates.shape[0], dim=0)
            self.current = ForwardRouting(given=gates)
        return self.current

    def end(self, num_layers: int) -> None:
        fwd, self.current = self.current, None
        if fwd is None or not fwd.routing:
            return
        missing = [l for l in range(num_layers) if l not in fwd.layer_gates]
        if missing:
            raise RoutingError(f"routing forward did not reach layers {missing}")
        self.state = RoutingState(torch.stack([fwd.layer_gates[l] for l in range(num_layers)], dim=1))
        self.lb_probs = [fwd.layer_probs[l] for l in sorted(fwd.layer_probs)]


_SESSION: contextvars.ContextVar[RoutingSession | None] = contextvars.ContextVar("milora_routing", default=None)


@contextlib.contextmanager
def routing_session(session: RoutingSession) -> Iterator[RoutingSession]:
    token = _SESSION.set(session)
    try:
        yield session
    finally:
        _SESSION.reset(token)


def current_session() -> RoutingSession:
    session = _SESSION.get()
    if session is None:
        raise RoutingError(
            "a MiLoRA-adapted model was called outside MiloraModel.forward/generate; call the "
            "MiloraModel wrapper (it carries the routing state), not the inner Hugging Face model; "
            "for gradient checkpointing use MiloraModel.gradient_checkpointing_enable()"
        )
    return session


def current_forward() -> ForwardRouting:
    fwd = current_session().current
    if fwd is None:
        raise RoutingError("no forward in progress in this routing session")
    return fwd


def checkpoint_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """torch.utils.checkpoint context_fn: the forward runs as is; the recompute, which happens
    during backward (outside the MiloraModel call), re-enters the routing session and forward
    it belongs to, so the checkpointed layer reads the same routing."""
    session = current_session()
    fwd = session.current

    @contextlib.contextmanager
    def recompute() -> Iterator[None]:
        token = _SESSION.set(session)
        previous, session.current = session.current, fwd
        try:
            yield
        finally:
            session.current = previous
            _SESSION.reset(token)

    return contextlib.nullcontext(), recompute()
