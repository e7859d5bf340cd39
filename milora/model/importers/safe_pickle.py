"""Read whole pickled nn.Modules (the reference code's lora_modules.bin / lora_gatings.bin)
without running any code they contain.

How: torch.load(weights_only=True) only rebuilds tensors and plain containers, and refuses
every other global. For the class names a reference checkpoint legitimately holds we
allowlist (stand-in, "module.path.Name") pairs, where each stand-in is an inert class of
ours. In torch's restricted unpickler an allowlisted class is only ever created with
cls.__new__ (NEWOBJ) and filled with __dict__.update (BUILD, as it has no __setstate__), so
the result is a tree of plain objects holding the pickled attributes; the real classes are
never imported. If a pickle instead *calls* a stand-in (REDUCE), its __init__ refuses.

Before loading, the pickle is disassembled statically (torch's get_unsafe_globals_in_checkpoint)
so that a global outside the allowlist (os.system, builtins.eval, ...) is refused with its
name, before a single object is built.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from milora.errors import UnsafeCheckpointError

# Classes and functions of the reference code (any package path: the code was run as
# src.llama2.em_lora, but a copy may live elsewhere). Matched on the last name component.
REFERENCE_CLASSES = ("LoRAModule", "LoRAGateWithPooling", "LoRAGate", "SelfAttnPooler", "LastPooler", "Rational")
REFERENCE_FUNCTIONS = ("Rational_PYTORCH_A_F", "Rational_PYTORCH_B_F", "Rational_PYTORCH_C_F", "Rational_PYTORCH_D_F")
# torch.nn classes the reference modules are built from; read as inert stand-ins too.
TORCH_CLASSES = (
    "torch.nn.modules.container.ModuleList", "torch.nn.modules.linear.Linear", "torch.nn.modules.linear.Identity",
    "torch.nn.modules.dropout.Dropout", "torch.nn.modules.activation.GELU", "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.activation.Softplus", "torch.nn.modules.activation.Softmax",
    "torch.nn.modules.pooling.AdaptiveAvgPool1d",
)


class StandIn:
    """Inert placeholder for a pickled object of class `qualified_name`: the unpickler fills
    its __dict__ with the pickled state (data only). It has no behaviour."""

    qualified_name = "?"

    def __init__(self, *args: Any, **kwargs: Any):
        # Only reached if a pickle *calls* the class (REDUCE) instead of rebuilding an
        # instance: legitimate torch.save output never does that.
        raise UnsafeCheckpointError(
            f"the checkpoint calls {self.qualified_name}(...) while unpickling, which a saved module never "
            "does; refusing it (nothing was executed)"
        )


@dataclass(frozen=True)
class GlobalRef:
    """A function the pickle referred to (e.g. Rational's activation_function), by name only."""

    name: str


@dataclass
class PickledModule:
    """A module read from a pickle: its class name as written in the file, its tensors
    (_parameters and _buffers), its plain attributes and its child modules."""

    cls: str
    tensors: dict[str, Tensor] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    children: dict[str, "PickledModule"] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """The class name without its module path (e.g. "LoRAModule", "Linear")."""
        return self.cls.rsplit(".", 1)[-1]


def _stand_in_function(name: str):
    def refuse(*args: Any, **kwargs: Any):
        raise UnsafeCheckpointError(f"the checkpoint calls {name}(...) while unpickling; refusing it")

    return refuse


def _allowlist(names: list[str]) -> tuple[list[tuple[Any, str]], dict[int, str], list[str]]:
    """Split the globals a pickle needs (beyond torch's own allowlist) into allowlisted
    stand-ins and refused names."""
    pairs: list[tuple[Any, str]] = []
    functions: dict[int, str] = {}
    refused = []
    for name in names:
        short = name.rsplit(".", 1)[-1]
        if name in TORCH_CLASSES or short in REFERENCE_CLASSES:
            pairs.append((type(short, (StandIn,), {"qualified_name": name}), name))
        elif short in REFERENCE_FUNCTIONS:
            fn = _stand_in_function(name)
            functions[id(fn)] = name
            pairs.append((fn, name))
        else:
            refused.append(name)
    return pairs, functions, refused


def _convert(obj: Any, functions: dict[int, str], where: str) -> Any:
    """Turn a stand-in tree into PickledModules; keep tensors and plain values only."""
    if isinstance(obj, StandIn):
        state = vars(obj)
        module = PickledModule(type(obj).qualified_name)
        for group in ("_parameters", "_buffers"):
            for k, v in (state.get(group) or {}).items():
                if isinstance(v, Tensor):
                    module.tensors[k] = v.detach()
        for k, v in (state.get("_modules") or {}).items():
            if v is not None:
                module.children[k] = _convert(v, functions, f"{where}.{k}")
        for k, v in state.items():
            if not k.startswith("_"):
                module.attrs[k] = _convert(v, functions, f"{where}.{k}")
        return module
    if callable(obj) and id(obj) in functions:
        return GlobalRef(functions[id(obj)])
    if obj is None or isinstance(obj, (bool, int, float, str, Tensor)):
        return obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_convert(v, functions, where) for v in obj)
    return repr(type(obj))  # containers of other kinds carry nothing we read


def load_pickled_modules(path: str | Path) -> PickledModule:
    """Read a torch.save'd module tree safely. UnsafeCheckpointError if it refers to any
    global outside the allowlist (nothing is executed), AdapterImportError-family errors for files
    that are not torch.save zip checkpoints."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise UnsafeCheckpointError(
            f"{path} is not a torch.save zip checkpoint (the format of torch >= 1.6); milora reads only that "
            "format safely. Fix: where you trust the file, load it with the reference code and torch.save it again"
        )
    try:
        unknown = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except (ValueError, RuntimeError, pickle.UnpicklingError, EOFError) as exc:
        raise UnsafeCheckpointError(f"{path} cannot be disassembled as a torch checkpoint ({exc})") from None
    pairs, functions, refused = _allowlist(unknown)
    if refused:
        raise UnsafeCheckpointError(
            f"{path} refers to {refused}, outside what a reference-code checkpoint holds (tensors, the classes "
            f"{list(REFERENCE_CLASSES)} and torch.nn containers/layers); refusing to unpickle it, nothing was "
            "executed. Fix: only import files written by the reference code's torch.save of list_lora_modules / "
            "list_lora_gatings"
        )
    try:
        with torch.serialization.safe_globals(pairs):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(f"{path} was refused by the restricted unpickler: {exc}") from None
    return _convert(obj, functions, path.name)
