"""Turning the milora::Select nodes of a traced graph (fused_ops.select) into ONNX If nodes.

The tracer computes both sides of a select in the main graph. For each Select (upstream ones
first, so an inner select is already an If when the outer one moves it), this pass finds each
side's cone: the nodes whose outputs only that side's values need, directly or through other
nodes of the cone (a node that anything else reads stays in the main graph, computed once).
The cone moves into the If's branch, in its original order; the branch's outputs are Identity
copies of the side's values (a branch may read, never re-export, an outer value). Values the
cone reads from outside (graph inputs, initializers, main-graph nodes) are read from the outer
scope, which ONNX If branches see.
"""

from __future__ import annotations

from collections import defaultdict

import onnx
from onnx import helper

from milora.errors import ExportError

SELECT = "Select"


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (If / Loop bodies, recursively) read from outside themselves."""
    reads: set[str] = set()
    for attr in node.attribute:
        for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            made = {i.name for i in sub.initializer} | {i.name for i in sub.input}
            for n in sub.node:
                reads.update(x for x in n.input if x and x not in made)
                reads.update(x for x in _subgraph_reads(n) if x not in made)
                made.update(n.output)
    return reads


def _reads(node: onnx.NodeProto, cache: dict[tuple, set[str]]) -> set[str]:
    """What a node reads (inputs and its subgraphs' outer reads), cached by its outputs (unique
    in a graph; the repeated field copies nodes, so object identity does not last)."""
    key = (node.op_type, tuple(node.output))
    if key not in cache:
        cache[key] = {x for x in node.input if x} | _subgraph_reads(node)
    return cache[key]


def _maps(nodes: list[onnx.NodeProto], sel_index: int, cache: dict[tuple, set[str]]):
    """(producer index of every value made before the select, reader indices of every value)."""
    producer = {o: i for i, n in enumerate(nodes[:sel_index]) for o in n.output if o}
    readers: dict[str, set[int]] = defaultdict(set)
    for i, n in enumerate(nodes):
        if i != sel_index:
            for x in _reads(n, cache):
                readers[x].add(i)
    return producer, readers


def _cone(nodes: list[onnx.NodeProto], values: list[str], keep: set[str], producer: dict[str, int],
          readers: dict[str, set[int]], cache: dict[tuple, set[str]]) -> set[int]:
    """Indices of the nodes before the select that only `values` need (see the module
    docstring); keep: names that must stay visible in the main graph (graph outputs, the other
    side)."""
    cone: set[int] = set()
    stack = [producer[v] for v in values if v in producer]
    while stack:  # ancestors of the side's values
        i = stack.pop()
        if i not in cone:
            cone.add(i)
            stack.extend(producer[x] for x in _reads(nodes[i], cache) if x in producer)
    # Drop nodes something outside the cone reads. Readers come later in the (topological)
    # order, so one pass from the last node back decides each node after all its readers.
    for i in sorted(cone, reverse=True):
        outs = [o for o in nodes[i].output if o]
        if any(o in keep for o in outs) or any(r not in cone for o in outs for r in readers[o]):
            cone.discard(i)
    return cone


def select_to_if(model: onnx.ModelProto) -> int:
    """Replace every milora::Select of the main graph by an If; returns how many."""
    graph = model.graph
    count = 0
    cache: dict[tuple, set[str]] = {}
    nodes = list(graph.node)  # worked on as a list; written back once (the repeated field copies)
    while True:
        at = next((i for i, n in enumerate(nodes) if n.op_type == SELECT and n.domain == "milora"), None)
        if at is None:
            break
        sel = nodes[at]
        attrs = {a.name: helper.get_attribute_value(a) for a in sel.attribute}
        n, types = attrs["n"], attrs["types"]
        then, other = list(sel.input[1:1 + n]), list(sel.input[1 + n:])
        if len(other) != n or len(types) != n:
            raise ExportError(f"internal: {sel.name or 'a Select node'} has {len(sel.input) - 1} values for n={n}")
        outputs = {o.name for o in graph.output}
        producer, readers = _maps(nodes, at, cache)
        cones = [_cone(nodes, side, outputs | set(rest), producer, readers, cache)
                 for side, rest in ((then, other), (other, then))]
        cones[1] -= cones[0]
        branches = []
        for side, cone, label in ((then, cones[0], "then"), (other, cones[1], "else")):
            body = [nodes[i] for i in sorted(cone)]
            outs = []
            for k, (value, elem) in enumerate(zip(side, types)):
                name = f"{sel.output[k]}/{label}"
                body.append(helper.make_node("Identity", [value], [name], name=f"{name}/Identity"))
                outs.append(helper.make_tensor_value_info(name, elem, None))
            branches.append(helper.make_graph(body, f"{sel.name or sel.output[0]}/{label}", [], outs))
        moved = cones[0] | cones[1]
        rest = [node for i, node in enumerate(nodes) if i not in moved and i != at]
        before = sum(1 for i in range(at) if i not in moved)
        iff = helper.make_node("If", [sel.input[0]], list(sel.output), name=(sel.name or sel.output[0]) + "/If",
                               then_branch=branches[0], else_branch=branches[1])
        rest.insert(before, iff)
        nodes = rest
        count += 1
    if count:
        final = []
        for node in nodes:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            final.append(copy)
        del graph.node[:]
        graph.node.extend(final)
    return count
