"""MiloraConfig: every option of the method, typed and validated (docs/method.md).

Free of torch: the exporter's manifest and the runtime read the same JSON form.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from milora.format.contract import ADAPTER_FORMAT_VERSION, EXPERTS
from milora.errors import ConfigError

POOLERS = ("attention", "last", "mean", "max")
ACTIVATIONS = ("rational", "gelu", "relu", "identity")
ACTIVATION_POSITIONS = ("post_pool", "pre_pool")
GATE_MODES = ("paper", "renormalized")
LB_LOSSES = ("switch", "cv2", "none")
RATIONAL_INITS = ("gelu", "relu")
# Every key of the JSON form (adapter format v1); a reader refuses any other.
JSON_KEYS = ("format_version", "rank", "alpha", "top_k", "experts", "routed", "pooler", "activation",
             "activation_position", "gate_mode", "lb_loss", "lb_coef", "noisy_gating", "dropout", "notes", "base")


def _is_int(value: Any) -> bool:
    # bool is an int in Python, but rank=True is a mistake, not a rank of 1.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not supported; expected one of {', '.join(allowed)}")


@dataclass
class MiloraConfig:
    """Options of one MiLoRA adapter. Defaults are the project defaults of docs/method.md.

    rank, alpha: LoRA rank r and alpha; each update is scaled by alpha / r.
    top_k: experts (of the target modules) switched on per layer, 1..len(target_modules).
    target_modules: which of the 7 modules carry a LoRA expert, a subset of EXPERTS.
    routed: False for a tenant with no router (an imported plain LoRA adapter): its gates are
        fixed at 1.0 on every target module in every layer.
    pooler, activation, rational_degrees, rational_init, activation_position, gate_mode:
        the router (docs/method.md, "The router").
    lb_loss, lb_coef: load-balancing loss (switch | cv2 | none) and its coefficient.
    noisy_gating: add softplus(h W_noise)-scaled Gaussian noise to router logits in training.
    dropout: dropout on the LoRA input in training.
    """

    rank: int = 32
    alpha: float = 64.0
    top_k: int = 1
    target_modules: tuple[str, ...] = EXPERTS
    routed: bool = True
    pooler: str = "attention"
    activation: str = "rational"
    rational_degrees: tuple[int, int] = (5, 4)
    rational_init: str = "gelu"
    activation_position: str = "post_pool"
    gate_mode: str = "paper"
    lb_loss: str = "switch"
    lb_coef: float = 1e-2
    noisy_gating: bool = False
    dropout: float = 0.0
    # Free-form provenance (e.g. "imported from PEFT"); never affects the maths.
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_numbers()
        self._check_target_modules()
        n = len(self.target_modules)
        if not _is_int(self.top_k) or not 1 <= self.top_k <= n:
            raise ConfigError(
                f"top_k={self.top_k!r} is out of range; expected an integer in 1..{n} (the number of target "
                f"modules, {', '.join(self.target_modules)}). Fix: set top_k between 1 and {n}"
            )
        for name in ("routed", "noisy_gating"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r}; expected a bool (True or False)")
        _choice("pooler", self.pooler, POOLERS)
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("activation_position", self.activation_position, ACTIVATION_POSITIONS)
        _choice("gate_mode", self.gate_mode, GATE_MODES)
        _choice("lb_loss", self.lb_loss, LB_LOSSES)
        _choice("rational_init", self.rational_init, RATIONAL_INITS)
        self._check_rational_degrees()
        if not isinstance(self.notes, dict):
            raise ConfigError(f"notes={self.notes!r}; expected a dict (free-form provenance)")

    def _check_numbers(self) -> None:
        if not _is_int(self.rank) or self.rank < 1:
            raise ConfigError(f"rank={self.rank!r}; expected a positive integer (the LoRA rank r). Fix: set rank >= 1, "
                              "e.g. 8")
        if not _is_number(self.alpha) or self.alpha <= 0:
            raise ConfigError(f"alpha={self.alpha!r}; expected a positive finite number (scale = alpha / rank)")
        self.alpha = float(self.alpha)
        if not _is_number(self.lb_coef) or self.lb_coef < 0:
            raise ConfigError(f"lb_coef={self.lb_coef!r}; expected a finite number >= 0")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout!r}; expected a number in [0, 1)")

    def _check_target_modules(self) -> None:
        if isinstance(self.target_modules, str):
            # A bare string would otherwise be split into characters.
            self.target_modules = (self.target_modules,)
        try:
            self.target_modules = tuple(self.target_modules)
        except TypeError:
            raise ConfigError(
                f"target_modules={self.target_modules!r}; expected a list of names from {', '.join(EXPERTS)}"
            ) from None
        if not self.target_modules:
            raise ConfigError(f"target_modules={self.target_modules!r} is empty; expected a non-empty subset of {', '.join(EXPERTS)}")
        unknown = [m for m in self.target_modules if m not in EXPERTS]
        if unknown:
            raise ConfigError(f"target_modules contains {unknown}; expected names from {', '.join(EXPERTS)}")
        if len(set(self.target_modules)) != len(self.target_modules):
            raise ConfigError(
                f"target_modules has duplicates: {list(self.target_modules)}; expected each module at most once"
            )
        # Expert order is always the canonical order, whatever order the user wrote.
        self.target_modules = tuple(m for m in EXPERTS if m in self.target_modules)

    def _check_rational_degrees(self) -> None:
        degrees = self.rational_degrees
        if isinstance(degrees, (str, bytes)) or not hasattr(degrees, "__len__") or len(degrees) != 2 \
                or not all(_is_int(d) and d >= 1 for d in degrees):
            raise ConfigError(
                f"rational_degrees={degrees!r}; expected (numerator, denominator) integer degrees >= 1, "
                "e.g. (5, 4) or (6, 5)"
            )
        self.rational_degrees = (int(degrees[0]), int(degrees[1]))
        if self.rational_degrees not in ((5, 4), (6, 5)) and self.activation == "rational":
            # Only these two have published initialisations (docs/method.md).
            raise ConfigError(
                f"rational_degrees={self.rational_degrees} has no known initialisation; "
                "expected (5, 4) (reference code) or (6, 5) (paper)"
            )

    @property
    def scale(self) -> float:
        """LoRA scale s = alpha / r applied to every update."""
        return self.alpha / self.rank

    @property
    def num_experts(self) -> int:
        return len(self.target_modules)

    # ---- JSON form (adapter format v1, docs/adapter-format.md) ----

    def to_json_dict(self, base: dict[str, Any]) -> dict[str, Any]:
        activation: dict[str, Any] = {"type": self.activation}
        if self.activation == "rational":
            activation["degrees"] = list(self.rational_degrees)
            activation["init"] = self.rational_init
        return {
            "format_version": ADAPTER_FORMAT_VERSION,
            "rank": self.rank,
            "alpha": self.alpha,
            "top_k": self.top_k,
            "experts": list(self.target_modules),
            "routed": self.routed,
            "pooler": self.pooler,
            "activation": activation,
            "activation_position": self.activation_position,
            "gate_mode": self.gate_mode,
            "lb_loss": self.lb_loss,
            "lb_coef": self.lb_coef,
            "noisy_gating": self.noisy_gating,
            "dropout": self.dropout,
            "notes": self.notes,
            "base": dict(base),
        }

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> "MiloraConfig":
        """Inverse of to_json_dict (the 'base' entry is returned separately by the loader).
        Keys this version does not read are refused by name, never silently ignored."""
        version = data.get("format_version")
        if version != ADAPTER_FORMAT_VERSION:
            raise ConfigError(
                f"adapter format_version={version!r} is not supported; this milora reads version "
                f"{ADAPTER_FORMAT_VERSION}. Re-save the adapter with a matching milora."
            )
        unknown = sorted(set(data) - set(JSON_KEYS))
        if unknown:
            raise ConfigError(
                f"adapter config has keys this milora does not read: {unknown}; expected only {list(JSON_KEYS)}. "
                "Fix: remove them (free-form provenance belongs in 'notes')"
            )
        missing = [k for k in ("rank", "alpha", "top_k", "experts", "pooler", "activation") if k not in data]
        if missing:
            raise ConfigError(f"adapter config lacks required keys {missing}. Fix: re-save the adapter with milora")
        act = data["activation"]
        if not isinstance(act, dict) or "type" not in act:
            raise ConfigError(f"'activation' must be an object with a 'type', got {act!r}; expected e.g. "
                              '{"type": "rational", "degrees": [5, 4], "init": "gelu"} or {"type": "gelu"}')
        read = ("type", "degrees", "init") if act["type"] == "rational" else ("type",)
        ignored = sorted(set(act) - set(read))
        if ignored:
            raise ConfigError(
                f"'activation' has keys {ignored} that are not read for type {act['type']!r} (degrees and init "
                f"belong to the rational activation only); expected only {list(read)}. Fix: remove them, or set "
                "type 'rational' if the adapter was trained with one"
            )
        experts = data["experts"]
        if not isinstance(experts, list) or not all(isinstance(e, str) for e in experts):
            raise ConfigError(f"'experts' is {experts!r}; expected a list of module names from {', '.join(EXPERTS)}")
        kwargs: dict[str, Any] = dict(
            rank=data["rank"],
            alpha=data["alpha"],
            top_k=data["top_k"],
            target_modules=tuple(experts),
            routed=data.get("routed", True),
            pooler=data["pooler"],
            activation=act["type"],
            activation_position=data.get("activation_position", "post_pool"),
            gate_mode=data.get("gate_mode", "paper"),
            lb_loss=data.get("lb_loss", "switch"),
            lb_coef=data.get("lb_coef", 1e-2),
            noisy_gating=data.get("noisy_gating", False),
            dropout=data.get("dropout", 0.0),
            notes=data.get("notes", {}),
        )
        if act["type"] == "rational":
            kwargs["rational_degrees"] = act.get("degrees", (5, 4))
            kwargs["rational_init"] = act.get("init", "gelu")
        return cls(**kwargs)

    def replace(self, **changes: Any) -> "MiloraConfig":
        return dataclasses.replace(self, **changes)
