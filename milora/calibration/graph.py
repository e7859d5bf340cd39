"""What a quantizer needs to know about an exported graph, read from its structure alone (never
from node names, which differ between the graph flavours milora-export writes):

    weight MatMuls   MatMul / Gemm nodes of the main graph whose B is a float initializer of rank 2
                     (the base model's projections; the LoRA MatMuls read banks, which are graph
                     inputs, so they are never among them)
    embedding        Gather nodes whose data is a float [V, d] initializer and whose indices come
                     from input_ids
    LM head          the weight MatMul whose output reaches the logits output through no other
                     MatMul (its B has V columns)
    routers          (prefill) the nodes that compute the gates and nothing else: everything the
                     gates output depends on, minus what the logits and KV outputs depend on once
                     the per-layer gate tensors are cut (see router_nodes)
    router logits    (prefill) per layer, the output of the router's MatMul with the router.weight
                     bank: the margins of the agreement report are read from it

Node names are only used to hand node lists to onnxruntime's quantizers; name_nodes() first
gives every node a unique name (an unnamed or duplicated node would otherwise be ambiguous).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

import onnx

from milora.export.branches import outer_reads, subgraphs
from milora.format import manifest as mf

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
# Ops that only move or relabel data: walking back from the gates output through them reaches
# the per-layer gate tensors (torch.stack is Unsqueeze + Concat).
LAYOUT_OPS = {"Concat", "Unsqueeze", "Squeeze", "Reshape", "Identity", "Cast", "Transpose", "Flatten"}
# Ops allowed between the LM head's MatMul and the logits output (a bias, a cast, a reshape).
HEAD_TAIL_OPS = LAYOUT_OPS | {"Add", "Slice", "Gather", "Mul", "Div", "Tanh"}


def name_nodes(graph: onnx.GraphProto, prefix: str = "milora_calib") -> int:
    """Give every node of graph (and its subgraphs) a unique non-empty name; returns how many
    were renamed. Names of already-unique nodes are kept."""
    seen: set[str] = set()
    renamed = 0
    for i, node in enumerate(all_nodes(graph)):
        if not node.name or node.name in seen:
            node.name = f"{prefix}/{node.op_type}_{i}"
            renamed += 1
        seen.add(node.name)
    return renamed


def all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """The graph's nodes and, recursively, its subgraphs' (an If's branches)."""
    for node in graph.node:
        yield node
        for g in subgraphs(node):
            yield from all_nodes(g)


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """Explicit inputs plus the outer-scope names its subgraphs read (an If's branches)."""
    names = [x for x in node.input if x]
    for g in subgraphs(node):
        names += sorted(outer_reads(g))
    return names


@dataclass
class Graph:
    """Indexes over one model's main graph."""

    model: onnx.ModelProto
    producer: dict[str, onnx.NodeProto] = field(init=False)
    consumers: dict[str, list[onnx.NodeProto]] = field(init=False)
    initializers: dict[str, onnx.TensorProto] = field(init=False)

    def __post_init__(self) -> None:
        g = self.model.graph
        self.producer = {o: n for n in g.node for o in n.output if o}
        self.consumers = {}
        for n in g.node:
            for x in node_inputs(n):
                self.consumers.setdefault(x, []).append(n)
        self.initializers = {t.name: t for t in g.initializer}

    @property
    def outputs(self) -> list[str]:
        return [o.name for o in self.model.graph.output]

    @property
    def inputs(self) -> list[str]:
        return [i.name for i in self.model.graph.input]

    def weight(self, name: str) -> onnx.TensorProto | None:
        """The float initializer of rank 2 called name, else None."""
        t = self.initializers.get(name)
        return t if t is not None and t.data_type in FLOAT_TYPES and len(t.dims) == 2 else None

    def backward(self, targets: Iterable[str], cut: set[str] = frozenset()) -> set[str]:
        """Names of the nodes the target tensors depend on; tensors in cut are not expanded."""
        seen: set[str] = set()
        stack = [t for t in targets if t not in cut]
        done: set[str] = set()
        while stack:
            t = stack.pop()
            if t in done:
                continue
            done.add(t)
            node = self.producer.get(t)
            if node is None or node.name in seen:
                continue
            seen.add(node.name)
            stack.extend(x for x in node_inputs(node) if x not in cut)
        return seen

    def forward(self, sources: Iterable[str]) -> set[str]:
        """Names of the nodes that depend on the source tensors."""
        seen: set[str] = set()
        stack = list(sources)
        while stack:
            for node in self.consumers.get(stack.pop(), []):
                if node.name not in seen:
                    seen.add(node.name)
                    stack.extend(node.output)
        return seen


@dataclass
class Plan:
    """What one graph holds, by node name (after name_nodes)."""

    weight_matmuls: list[str]
    embedding: list[str]
    lm_head: list[str]
    router_nodes: set[str]
    gate_tensors: list[str]  # per layer, prefill only: the tensors stacked into the gates output
    router_logits: list[str | None]  # per layer, prefill only (None where no router MatMul was found)

    def summary(self) -> dict[str, int]:
        return {"weight_matmuls": len(self.weight_matmuls), "embedding_gathers": len(self.embedding),
                "lm_head": len(self.lm_head), "router_nodes": len(self.router_nodes)}


def plan(model: onnx.ModelProto, vocab_size: int) -> Plan:
    """Read the graph's structure (module docstring). Call name_nodes(model.graph) first."""
    g = Graph(model)
    gate_tensors = _gate_tensors(g)
    routers = router_nodes(g, gate_tensors)
    matmuls = []
    for node in model.graph.node:
        if node.name in routers:
            continue
        if node.op_type == "MatMul" and len(node.input) == 2 and g.weight(node.input[1]) is not None:
            matmuls.append(node.name)
        elif node.op_type == "Gemm" and len(node.input) >= 2 and g.weight(node.input[1]) is not None:
            matmuls.append(node.name)
    ids_nodes = g.forward([mf.INPUT_IDS])
    embedding = [n.name for n in model.graph.node
                 if n.op_type == "Gather" and n.name in ids_nodes and n.name not in routers
                 and g.weight(n.input[0]) is not None and g.weight(n.input[0]).dims[0] == vocab_size]
    by_name = {n.name: n for n in model.graph.node}
    head = [m for m in matmuls if _columns(g, by_name[m]) == vocab_size and _reaches_logits(g, by_name[m])]
    weight_side = g.forward([mf.ROUTER_WEIGHT])
    logits = [_router_logits(g, t, set(gate_tensors) - {t}, routers, weight_side) for t in gate_tensors]
    return Plan(matmuls, embedding, head, routers, gate_tensors, logits)


def _columns(g: Graph, node: onnx.NodeProto) -> int:
    dims = list(g.initializers[node.input[1]].dims)
    trans_b = any(a.name == "transB" and a.i == 1 for a in node.attribute) if node.op_type == "Gemm" else False
    return dims[0] if trans_b else dims[1]


def _reaches_logits(g: Graph, node: onnx.NodeProto, depth: int = 6) -> bool:
    frontier = list(node.output)
    for _ in range(depth):
        if mf.LOGITS in frontier:
            return True
        frontier = [o for t in frontier for n in g.consumers.get(t, []) if n.op_type in HEAD_TAIL_OPS for o in n.output]
    return mf.LOGITS in frontier


def _gate_tensors(g: Graph) -> list[str]:
    """The per-layer gate tensors: walk back from the gates output through layout ops (the
    stack of the layers' gates) to the first tensors computed otherwise, in layer order."""
    if mf.GATES not in g.outputs:
        return []
    found: list[str] = []

    def walk(t: str) -> None:
        node = g.producer.get(t)
        if node is None or node.op_type not in LAYOUT_OPS:
            if t not in found:
                found.append(t)
            return
        # Data inputs only: a Reshape's shape, an Unsqueeze's axes are constants.
        data = node.input if node.op_type == "Concat" else node.input[:1]
        for x in data:
            if x and x not in g.initializers and (g.producer.get(x) is None or g.producer[x].op_type != "Constant"):
                walk(x)

    walk(mf.GATES)
    return found


def router_nodes(g: Graph, gate_tensors: list[str]) -> set[str]:
    """Nodes that only serve the gates: backward(gates output) minus backward(logits, KV) with
    the gate tensors cut (the LoRA of layer l reads gate tensor l; a router of layer l reads the
    hidden state that the logits also need, so the hidden state's nodes are not router nodes)."""
    if not gate_tensors:
        return set()
    others = [o for o in g.outputs if o != mf.GATES]
    return g.backward([mf.GATES]) - g.backward(others, cut=set(gate_tensors))


def _router_logits(g: Graph, gate: str, other_gates: set[str], routers: set[str], weight_side: set[str]) -> str | None:
    """The output of the MatMul of layer `gate`'s router that reads the router.weight bank (the
    other layers' gate tensors cut: earlier routers reach this one through the LoRA)."""
    mine = g.backward([gate], cut=other_gates) & routers
    for node in g.model.graph.node:
        if node.name in mine and node.op_type == "MatMul" and any(
                g.producer.get(x) is not None and g.producer[x].name in weight_side or x == mf.ROUTER_WEIGHT
                for x in node.input):
            return node.output[0]
    return None
