"""The TensorRT plugin's logic as plain functions (no tensorrt import): its id, its attributes,
the type and rank rules of its descriptor, its type combinations and tactics, and the launch
of its ahead-of-time kernel. milora/plugins/trt_plugin.py wires these into tensorrt.plugin.

Names come from the op's spec (milora/export/routed_lora.py), never retyped: the exporter writes
nodes of type RoutedLora in domain milora with plugin_namespace "milora" and plugin_version "1",
and TensorRT's ONNX parser looks up the plugin "<plugin_namespace>::<op_type>".

Shape legend: B rows, T tokens, d_in / d_out, S slots, L layers, R rank, G gates per row.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from milora.errors import EngineBuildError
from milora.plugins import op_spec as rl
from milora.plugins import launch

PLUGIN_ID = f"{rl.PLUGIN_NAMESPACE}::{rl.OP_TYPE}"
PLUGIN_VERSION = rl.PLUGIN_VERSION
INPUTS = tuple(name for name, _, _ in rl.SPEC["inputs"])
# The attributes the plugin takes from the node (the int ones; plugin_namespace / plugin_version
# are read by the parser to find the plugin).
ATTRIBUTES = tuple(name for name, (kind, _) in rl.SPEC["attributes"].items() if kind == "int")

# TensorRT DataType names -> the kernel's dtypes (x, base_out, lora_A, lora_B, y share one).
DATA_TYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16"}
INDEX_TYPE, GATE_TYPE = "INT64", "FLOAT"  # tenant_slots, layer_gates
# Positions of the plugin's tensors in TensorRT's in_out order (inputs 0..5, then the output 6).
DATA_POSITIONS, SLOT_POSITION, GATE_POSITION, OUTPUT_POSITION = [0, 1, 2, 3, 6], 4, 5, 6
# AutoTuneCombination type strings per position group ("FP32|FP16|BF16" = all data positions
# share one of these, index-aligned).
AUTOTUNE_TYPES = [(DATA_POSITIONS, "FP32|FP16|BF16"), ([SLOT_POSITION], "INT64"), ([GATE_POSITION], "FP32")]

# In place (the default) the output is aliased to base_out, so a row that does not use the
# module costs nothing. MILORA_TRT_OUT_OF_PLACE=1 registers a separate output instead (the
# kernel sees the addresses differ and copies base_out for those rows); read once, when the
# plugin is registered.
OUT_OF_PLACE_ENV = "MILORA_TRT_OUT_OF_PLACE"


def in_place() -> bool:
    return os.environ.get(OUT_OF_PLACE_ENV, "") not in ("1", "true", "yes")


def check_io(dtype_names: list[str], ranks: list[int]) -> str:
    """The descriptor's rules: six inputs of ranks (3, 3, 4, 4, 1, 2); x, base_out, lora_A,
    lora_B of one float type; tenant_slots INT64; layer_gates FLOAT. Returns the output's type
    name (base_out's). EngineBuildError names what is wrong (raised while TensorRT builds)."""
    if len(dtype_names) != len(INPUTS) or len(ranks) != len(INPUTS):
        raise EngineBuildError(f"{PLUGIN_ID} takes {len(INPUTS)} inputs ({', '.join(INPUTS)}), got {len(dtype_names)}; "
                               "the node was not written by milora-export --target tensorrt")
    bad = [f"{n} has rank {r}, expected {e}" for n, r, e in zip(INPUTS, ranks, launch.INPUT_RANKS) if r != e]
    data = dtype_names[:4]
    if len(set(data)) != 1 or data[0] not in DATA_TYPES:
        bad.append(f"x, base_out, lora_A, lora_B have types {data}, expected one of {sorted(DATA_TYPES)} for all four")
    if dtype_names[4] != INDEX_TYPE:
        bad.append(f"tenant_slots has type {dtype_names[4]}, expected {INDEX_TYPE}")
    if dtype_names[5] != GATE_TYPE:
        bad.append(f"layer_gates has type {dtype_names[5]}, expected {GATE_TYPE}")
    if bad:
        raise EngineBuildError(f"{PLUGIN_ID} inputs do not match the op's spec: {'; '.join(bad)}. Fix: build from a "
                               "graph written by milora-export --target tensorrt (milora/export/routed_lora.py SPEC)")
    return dtype_names[1]


def tactic_ids() -> list[int]:
    """Every tactic: TensorRT times each on the build GPU at the profile's opt shapes."""
    return list(launch.TACTICS)


def known_tactic(tactic) -> int:
    """The tactic TensorRT picked, or (when it passes none, e.g. 0) a decode shape: every tactic
    is correct for every T, so the fallback only costs speed."""
    return tactic if tactic in launch.TACTICS else launch.DECODE_TACTICS[-1]


def kernel_dtype(trt_type_name: str) -> str:
    if trt_type_name not in DATA_TYPES:
        raise EngineBuildError(f"{PLUGIN_ID} has no kernel for {trt_type_name}; expected one of {sorted(DATA_TYPES)}")
    return DATA_TYPES[trt_type_name]


def static_dim(value: Any, what: str) -> int:
    """A dimension the kernel is compiled for (the banks' rank): an int > 0, else EngineBuildError."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    raise EngineBuildError(f"{PLUGIN_ID}: {what} must be fixed when the engine is built (the kernel is compiled for "
                           f"it), got {value!r}. Fix: keep the banks' rank static (milora-export writes it so)")


def launch_config(dims: list[list[Any]], layer: int, expert: int, params: launch.KernelParams,
                  cdiv: Callable[[Any, Any], Any]) -> dict[str, Any]:
    """Grid, block and scalar arguments of one launch. `dims` are the six inputs' dimensions as
    ints or as TensorRT shape expressions (anything with the arithmetic `cdiv` needs), so the
    same function serves the ahead-of-time plugin (symbolic, resolved per call) and tests.

        grid    (B, cdiv(T, BLOCK_T), cdiv(d_out, BLOCK_N))    block  (32 * num_warps, 1, 1)
        scalars B, T, d_in, d_out, R, S, L, G, layer, expert    (launch.SCALARS order)
    """
    x, base, a, _, _, gates = dims
    values = {"B": x[0], "T": x[1], "D_IN": x[2], "D_OUT": base[2], "R": a[3], "S": a[0], "L": a[1], "G": gates[1],
              "layer": layer, "expert": expert}
    return {"grid": (x[0], cdiv(x[1], params.BLOCK_T), cdiv(base[2], params.BLOCK_N)),
            "block": (32 * params.num_warps, 1, 1), "scalars": [values[n] for n in launch.SCALARS]}
