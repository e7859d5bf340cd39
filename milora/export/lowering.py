"""Lowering of the milora::RoutedLora nodes of a traced graph (routed_lora.py).

    dense     every row computes every module; the gate (0 for rows that do not use it)
              multiplies the rank-R intermediate.
    if_skip   dense, inside an If whose condition is "some row's gate is non-zero": a module
              no row uses costs one ReduceMax and nothing else.
    if_compact compact inside the same If (a module no row uses skips the NonZero too).
    compact   NonZero picks the rows whose gate is non-zero; only those are gathered,
              multiplied and scattered back (ScatterND). The default: fastest for mixed
              batches at B >= 4 and on par for base-only batches (BENCHMARKS.md).
    tensorrt  the node stays (one per layer and module), gains plugin_namespace /
              plugin_version, and the model gets a local function of the same name whose
              body is the dense maths in standard ops (onnxruntime runs it; TensorRT's
              parser maps the node to the plugin).

Bank gathers use one flat index per (layer, row), idx = slot * L + layer, into the bank
reshaped to [S*L, ...]: one Gather per matrix instead of two.

Row isolation: "row b uses the module" is gate[b] != 0, decided per row; the If condition is
"some row uses it". Both read NaN as used (NaN != 0), so a corrupt row's NaN reaches its own
output (where the runtime reports it) and never turns LoRA off for the other rows: a
reduction like ReduceMax(gate) > 0 would be NaN for the whole batch and skip every row.
A row that does not use the module gets base_out unchanged whichever branch runs.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from milora.format.contract import EXPERTS
from milora.errors import ExportError
from milora.export import routed_lora as rl

LOWERINGS = ("dense", "if_skip", "compact", "if_compact")
DEFAULT_LOWERING = "if_compact"  # chosen by measurement on a quiet box: BENCHMARKS.md (runtime section)


class _Emitter:
    """Collects nodes and constants for one graph; names follow /model/layers.{l}/{module}/..."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.inputs = {i.name: i for i in graph.input}
        self.nodes: list[onnx.NodeProto] = []
        self.cache: dict[tuple, str] = {}

    def const(self, name: str, values: list[int]) -> str:
        key = ("const", tuple(values), name.endswith("scalar"))
        if key not in self.cache:
            shape = [] if name.endswith("scalar") else [len(values)]
            out = f"/milora/const/{name}_{'_'.join(str(v) for v in values).replace('-', 'm')}"
            self.nodes.append(helper.make_node("Constant", [], [out], value=helper.make_tensor(
                out, TensorProto.INT64, shape, values)))
            self.cache[key] = out
        return self.cache[key]

    def dims(self, name: str) -> list[int | str]:
        t = self.inputs[name].type.tensor_type
        return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        out = f"{name}_output_0"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def flat_bank(self, bank: str) -> str:
        """bank [S, L, a, b] -> [S*L, a, b] (shared by every layer)."""
        key = ("flat", bank)
        if key not in self.cache:
            _, _, a, b = self.dims(bank)
            self.cache[key] = self.node("Reshape", [bank, self.const("shape", [-1, a, b])], f"/milora/{bank}/Flat")
        return self.cache[key]

    def flat_index(self, slots: str, layer: int, num_layers: int) -> str:
        """idx [B] = slot * L + layer (shared by the 7 modules of a layer)."""
        key = ("idx", slots, layer)
        if key not in self.cache:
            scaled = self.cache.get(("scaled", slots)) or self.node(
                "Mul", [slots, self.const("scalar", [num_layers])], "/milora/slots/ScaleByLayers")
            self.cache[("scaled", slots)] = scaled
            self.cache[key] = self.node("Add", [scaled, self.const("scalar", [layer])],
                                        f"/model/layers.{layer}/lora/SlotIndex")
        return self.cache[key]


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _gate(em: _Emitter, node, pre: str) -> tuple[str, str]:
    """(gate [B] float32, gate [B, 1, 1] in the LoRA dtype) of one node.

        layer_gates[B, 7] -> Gather(expert) -> gate[B] -> CastLike(x) -> Reshape[B, 1, 1]
    """
    a = _attrs(node)
    g = em.node("Gather", [node.input[5], em.const("scalar", [a["expert"]])], f"{pre}/Gate", axis=1)
    gx = em.node("CastLike", [g, node.input[0]], f"{pre}/GateCast")
    return g, em.node("Reshape", [gx, em.const("shape", [-1, 1, 1])], f"{pre}/GateShape")


def _update_nodes(em: _Emitter, pre: str, x: str, idx: str, a_flat: str, b_flat: str, gate3: str) -> str:
    """The gated update of rows (x [n, T, d_in], idx [n]):

        A = Gather(A_flat, idx) [n, d_in, R]     B = Gather(B_flat, idx) [n, R, d_out]
        u = MatMul(x, A) * gate [n, T, R]         d = MatMul(u, B) [n, T, d_out]
    """
    a = em.node("Gather", [a_flat, idx], f"{pre}/GatherA", axis=0)
    b = em.node("Gather", [b_flat, idx], f"{pre}/GatherB", axis=0)
    u = em.node("MatMul", [x, a], f"{pre}/MatMulA")
    u = em.node("Mul", [u, gate3], f"{pre}/MulGate")
    return em.node("MatMul", [u, b], f"{pre}/MatMulB")


def _lower_dense(em: _Emitter, node, pre: str, idx: str, a_flat: str, b_flat: str) -> None:
    """y = Add(base_out, update(x, idx, gate))   (every row, every module; gate 0 = no effect)"""
    _, gate3 = _gate(em, node, pre)
    d = _update_nodes(em, pre, node.input[0], idx, a_flat, b_flat, gate3)
    em.nodes.append(helper.make_node("Add", [node.input[1], d], [node.output[0]], name=f"{pre}/Add"))


def _rows_using(em: _Emitter, g: str, pre: str) -> str:
    """used [B] bool = Not(Equal(gate, 0)): NaN counts as used (see the module docstring)."""
    return em.node("Not", [em.node("Equal", [g, _zero_f32(em)], f"{pre}/GateIsZero")], f"{pre}/Used")


def _in_if(inner):
    """Wrap a lowering in an If on "some row uses the module":

        cond = ReduceMax(Cast(gate != 0, float)) > 0        (NaN-safe: NaN != 0)
        y    = If(cond, then: inner(...) [nodes named pre/then/...], else: Identity(base_out))
    """
    def lower_in_if(em: _Emitter, node, pre: str, idx: str, a_flat: str, b_flat: str) -> None:
        g, _ = _gate(em, node, pre)
        used = em.node("Cast", [_rows_using(em, g, pre)], f"{pre}/UsedF", to=TensorProto.FLOAT)
        mx = em.node("ReduceMax", [used], f"{pre}/AnyRow", keepdims=0)
        cond = em.node("Greater", [mx, _zero_f32(em)], f"{pre}/AnyUsed")
        branch = _Emitter(em.graph)
        branch.cache = {k: v for k, v in em.cache.items() if k[0] in ("const", "zero")}  # outer names are visible
        out_then, out_else = f"{pre}/then/y", f"{pre}/else/y"
        inner_node = onnx.NodeProto()
        inner_node.CopyFrom(node)
        inner_node.output[0] = out_then
        inner(branch, inner_node, pre + "/then", idx, a_flat, b_flat)
        vi = helper.make_tensor_value_info
        then_g = helper.make_graph(branch.nodes, f"{pre}/then", [], [vi(out_then, _elem(em, node), None)])
        else_g = helper.make_graph([helper.make_node("Identity", [node.input[1]], [out_else], name=f"{pre}/else/Id")],
                                   f"{pre}/else", [], [vi(out_else, _elem(em, node), None)])
        em.nodes.append(helper.make_node("If", [cond], [node.output[0]], name=f"{pre}/If",
                                         then_branch=then_g, else_branch=else_g))
    return lower_in_if


def _lower_compact(em: _Emitter, node, pre: str, idx: str, a_flat: str, b_flat: str) -> None:
    """rows = NonZero(gate != 0) [n];  y = ScatterND(base_out, rows, base_out[rows] + update(x[rows]))."""
    g, gate3 = _gate(em, node, pre)
    used = _rows_using(em, g, pre)
    rows = em.node("Reshape", [em.node("NonZero", [used], f"{pre}/Rows"), em.const("shape", [-1])], f"{pre}/RowsFlat")
    xs = em.node("Gather", [node.input[0], rows], f"{pre}/GatherX", axis=0)
    d = _update_nodes(em, pre, xs, em.node("Gather", [idx, rows], f"{pre}/GatherIdx", axis=0), a_flat, b_flat,
                      em.node("Gather", [gate3, rows], f"{pre}/GatherGate", axis=0))
    ys = em.node("Add", [em.node("Gather", [node.input[1], rows], f"{pre}/GatherY", axis=0), d], f"{pre}/Add")
    where = em.node("Unsqueeze", [rows, em.const("shape", [-1])], f"{pre}/RowsIdx")
    em.nodes.append(helper.make_node("ScatterND", [node.input[1], where, ys], [node.output[0]], name=f"{pre}/Scatter"))


def _zero_f32(em: _Emitter) -> str:
    if ("zero",) not in em.cache:
        out = "/milora/const/zero_f32"
        em.nodes.append(helper.make_node("Constant", [], [out], value=helper.make_tensor(out, TensorProto.FLOAT, [], [0.0])))
        em.cache[("zero",)] = out
    return em.cache[("zero",)]


def _elem(em: _Emitter, node) -> int:
    return em.inputs[node.input[2]].type.tensor_type.elem_type


def _lower_none(em: _Emitter, node, pre: str, idx: str, a_flat: str, b_flat: str) -> None:
    """y = base_out: an export without tenants (the bare base model) computes no LoRA at all."""
    em.nodes.append(helper.make_node("Identity", [node.input[1]], [node.output[0]], name=f"{pre}/None"))


_LOWER = {"none": _lower_none, "dense": _lower_dense, "if_skip": _in_if(_lower_dense), "compact": _lower_compact,
          "if_compact": _in_if(_lower_compact)}


def lower(model: onnx.ModelProto, mode: str, num_layers: int) -> onnx.ModelProto:
    """Replace every RoutedLora node of model's main graph per `mode` (in place; returned)."""
    if mode == "tensorrt":
        return keep_as_plugin(model)
    if mode not in _LOWER:
        raise ExportError(f"--lora-lowering {mode!r} is not supported; expected one of {', '.join(LOWERINGS)}")
    em = _Emitter(model.graph)
    if mode == "none":  # no bank gathers either: the graph is the plain base model
        em.flat_index = em.flat_bank = lambda *args: ""
    for node in model.graph.node:
        if node.op_type != rl.OP_TYPE or node.domain != rl.DOMAIN:
            em.nodes.append(node)
            continue
        a = _attrs(node)
        pre = f"/model/layers.{a['layer']}/{EXPERTS[a['expert']]}/lora"
        idx = em.flat_index(node.input[4], a["layer"], num_layers)
        _LOWER[mode](em, node, pre, idx, em.flat_bank(node.input[2]), em.flat_bank(node.input[3]))
    del model.graph.node[:]
    model.graph.node.extend(em.nodes)
    kept = [o for o in model.opset_import if o.domain != rl.DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return model


def function_body(opset: int) -> onnx.FunctionProto:
    """RoutedLora in standard ops (model-local function; attributes layer, expert):

        A = Gather(Gather(lora_A, layer, axis=1), slots)   [B, d_in, R]
        B = Gather(Gather(lora_B, layer, axis=1), slots)   [B, R, d_out]
        g = Unsqueeze(CastLike(Gather(layer_gates, expert, axis=1), x), [1, 2])   [B, 1, 1]
        y = base_out + (MatMul(x, A) * g) @ B
    """
    ins = [name for name, _, _ in rl.SPEC["inputs"]]
    x, base_out, la, lb, slots, gates = ins
    n = helper.make_node
    ref = helper.make_attribute_ref
    nodes = [
        _ref_const("layer_c", "layer", ref), _ref_const("expert_c", "expert", ref),
        n("Constant", [], ["axes12"], value=helper.make_tensor("axes12", TensorProto.INT64, [2], [1, 2])),
        n("Gather", [la, "layer_c"], ["a_l"], axis=1), n("Gather", ["a_l", slots], ["a_b"], axis=0),
        n("Gather", [lb, "layer_c"], ["b_l"], axis=1), n("Gather", ["b_l", slots], ["b_b"], axis=0),
        n("Gather", [gates, "expert_c"], ["g"], axis=1), n("CastLike", ["g", x], ["g_x"]),
        n("Unsqueeze", ["g_x", "axes12"], ["g3"]),
        n("MatMul", [x, "a_b"], ["u"]), n("Mul", ["u", "g3"], ["ug"]), n("MatMul", ["ug", "b_b"], ["d"]),
        n("Add", [base_out, "d"], ["y"]),
    ]
    return helper.make_function(rl.DOMAIN, rl.OP_TYPE, ins, ["y"], nodes, [helper.make_opsetid("", opset)],
                                attributes=list(rl.SPEC["attributes"]))


def _ref_const(out: str, attr: str, ref) -> onnx.NodeProto:
    node = helper.make_node("Constant", [], [out])
    node.attribute.append(ref("value_int", onnx.AttributeProto.INT, ref_attr_name=attr))
    return node


def keep_as_plugin(model: onnx.ModelProto) -> onnx.ModelProto:
    """Target tensorrt: tag each RoutedLora node for TensorRT's plugin lookup and add the
    function body so onnxruntime (and onnx.reference) can run the same graph."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    for node in model.graph.node:
        if node.op_type == rl.OP_TYPE and node.domain == rl.DOMAIN:
            a = _attrs(node)
            node.name = f"/model/layers.{a['layer']}/{EXPERTS[a['expert']]}/lora/{rl.OP_TYPE}"
            node.attribute.extend([helper.make_attribute("plugin_namespace", rl.PLUGIN_NAMESPACE),
                                   helper.make_attribute("plugin_version", rl.PLUGIN_VERSION)])
    model.functions.append(function_body(opset))
    return model
