"""Turning the milora::Select nodes of a traced graph (fused_ops.select) into ONNX If nodes.

The tracer computes both sides of a select in the main graph. For each Select (upstream ones
first, so an inner select is already an If when the outer one moves it), this pass finds each
side's cone: the nodes whose outputs only that side's values need, directly or through other
nodes of the cone (a node that anything else reads stays in the main graph, computed once).
The cone moves into the If's branch, in its original order. The branch's outputs are the
side's values themselves where the cone makes them (so a large output, such as a KV buffer
that an operator updates in place, is written straight into the If's output, never copied),
and Identity copies of outer values (a branch may read, never re-export, an outer value). Values the
cone reads from outside (graph inputs, initializers, main-graph nodes) are read from the outer
scope, which ONNX If branches see.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Iterator

import onnx
from onnx import helper

from milora.errors import ExportError

SELECT = "Select"


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """A node's subgraphs (an If's branches, a Loop's body)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def outer_reads(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph (and, recursively, its own subgraphs) reads from the enclosing scope:
    the implicit inputs of the node that holds it."""
    made = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(x for x in node.input if x)
        for sub in subgraphs(node):
            used |= outer_reads(sub)
        made.update(node.output)
    return used - made


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs read from outside themselves."""
    return set().union(*(outer_reads(g) for g in subgraphs(node)))


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


def _rename_reads(nodes: Iterable[onnx.NodeProto], names: dict[str, str]) -> None:
    """Point every read of a name in `names` (by these nodes and in their subgraphs) at its
    replacement, in place."""
    for node in nodes:
        for k, x in enumerate(node.input):
            if x in names:
                node.input[k] = names[x]
        for sub in subgraphs(node):
            _rename_reads(sub.node, names)


def drop_aliases(model: onnx.ModelProto) -> int:
    """Remove the traced main graph's copies of a value under another name, before
    select_to_if: Identity copies of initializers (the tracer writes one where a weight is used
    twice, as when both sides of a select read it) and Casts to the type a value already has.
    Their readers read the value itself, so a weight stays a constant to every reader
    (onnxruntime prepacks a MatMul's constant weight once, however many nodes read it; an
    Identity would copy it at every call), and onnxruntime finds no no-op left to remove from
    inside a branch (which it cannot do, and says so at every session start). Returns how many."""
    graph = model.graph
    weights = {i.name for i in graph.initializer}
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info]}
    types.update({i.name: i.data_type for i in graph.initializer})
    for n in graph.node:  # the tracer records no type for some values; a Gather's is its data's
        if n.op_type == "Gather" and n.input[0] in types:
            types.setdefault(n.output[0], types[n.input[0]])
    outputs = {o.name for o in graph.output}

    def same(n: onnx.NodeProto) -> bool:
        if not n.input or n.output[0] in outputs:
            return False
        if n.op_type == "Identity":
            return n.input[0] in weights
        if n.op_type == "Cast":
            to = next((a.i for a in n.attribute if a.name == "to"), None)
            return types.get(n.input[0]) == to
        return False

    alias = {n.output[0]: n.input[0] for n in graph.node if same(n)}
    if alias:
        for name in list(alias):  # an alias of an alias
            while alias[name] in alias:
                alias[name] = alias[alias[name]]
        kept = [n for n in graph.node if not (n.output and n.output[0] in alias and same(n))]
        del graph.node[:]
        graph.node.extend(kept)
        _rename_reads(graph.node, alias)
    return len(alias)


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
            made = {o for i in cone for o in nodes[i].output if o}
            outs, named = [], set()
            for k, (value, elem) in enumerate(zip(side, types)):
                if value in made and value not in named:  # the branch's own value: its output as is
                    name = value
                else:  # an outer value, or one named twice: a branch output must be a value of its own
                    name = f"{sel.output[k]}/{label}"
                    body.append(helper.make_node("Identity", [value], [name], name=f"{name}/Identity"))
                named.add(name)
                outs.append(helper.make_tensor_value_info(name, elem, None))
            made = {o for n in body for o in n.output}  # the types the tracer recorded go with their values
            info = [v for v in graph.value_info if v.name in made]
            branches.append(helper.make_graph(body, f"{sel.name or sel.output[0]}/{label}", [], outs, value_info=info))
        moved = cones[0] | cones[1]
        rest = [node for i, node in enumerate(nodes) if i not in moved and i != at]
        before = sum(1 for i in range(at) if i not in moved)
        iff = helper.make_node("If", [sel.input[0]], list(sel.output), name=(sel.name or sel.output[0]) + "/If",
                               then_branch=branches[0], else_branch=branches[1])
        rest.insert(before, iff)
        nodes = rest
        count += 1
    if count:
        made = {o for n in nodes for o in n.output}
        kept_info = [v for v in graph.value_info if v.name in made]
        del graph.value_info[:]
        graph.value_info.extend(kept_info)
        final = []
        for node in nodes:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            final.append(copy)
        del graph.node[:]
        graph.node.extend(final)
    return count


# ------------------------------------------------ the fused graph's two phases, apart and back
#
# The fused flavour's graph is one If on ROUTE over two whole models that read one set of
# weights (the main graph's initializers): the prefill (then branch) and decode (else branch).
# Tools that transform weight MatMuls one graph at a time (onnxruntime's quantizers) see a flat
# model per phase: split() cuts the graph into those, join() puts transformed ones back under
# one If, each initializer once (identical ones, such as a weight both phases quantized the same
# way, are stored once; differing ones under the same name are renamed). Torch-free: onnx only.


def route_if(model: onnx.ModelProto, route: str) -> onnx.NodeProto | None:
    """The main graph's If on the route input, when it is the only thing the graph computes
    after its shared nodes (its outputs are the graph's outputs); None for any other graph."""
    graph = model.graph
    ifs = [n for n in graph.node if n.op_type == "If" and n.input[0] == route]
    if len(ifs) != 1 or list(ifs[0].output) != [o.name for o in graph.output]:
        return None
    return ifs[0]


def _rename_values(nodes: list[onnx.NodeProto], names: dict[str, str]) -> None:
    """Rename values made and read by nodes (and read in their subgraphs), in place."""
    for node in nodes:
        for k, o in enumerate(node.output):
            if o in names:
                node.output[k] = names[o]
    _rename_reads(nodes, names)


def split(model: onnx.ModelProto, route: str) -> dict[str, onnx.ModelProto] | None:
    """{"prefill": model, "decode": model}: each phase as a flat model with the graph's inputs
    and outputs (the shared nodes, then the branch's), or None when the graph is not one If on
    route (see above)."""
    iff = route_if(model, route)
    if iff is None:
        return None
    graph = model.graph
    shared = [n for n in graph.node if list(n.output) != list(iff.output)]
    branches = {a.name: a.g for a in iff.attribute}
    weights = {i.name: i for i in graph.initializer}
    parts = {}
    for role, attr in (("prefill", "then_branch"), ("decode", "else_branch")):
        branch = branches[attr]
        nodes = []
        for n in [*shared, *branch.node]:
            copy = onnx.NodeProto()
            copy.CopyFrom(n)
            nodes.append(copy)
        _rename_values(nodes, {b.name: o for b, o in zip(branch.output, iff.output)})
        cache: dict[tuple, set[str]] = {}
        reads = set().union(*(_reads(n, cache) for n in nodes))
        inits = [weights[x] for x in weights if x in reads] + list(branch.initializer)
        made = {o for n in nodes for o in n.output} - set(iff.output)
        info = [v for v in [*graph.value_info, *branch.value_info] if v.name in made]
        part = helper.make_graph(nodes, f"{graph.name}/{role}", list(graph.input), list(graph.output), initializer=inits,
                                 value_info=info)
        parts[role] = helper.make_model(part, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    return parts


def _same_tensor(a: onnx.TensorProto, b: onnx.TensorProto) -> bool:
    from onnx import numpy_helper

    if a.data_type != b.data_type or list(a.dims) != list(b.dims):
        return False
    return numpy_helper.to_array(a).tobytes() == numpy_helper.to_array(b).tobytes()


def _toposorted(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """nodes in an order where each comes after the nodes making what it reads (its subgraphs'
    outer reads too; names nothing here makes are outer values): onnxruntime requires it of a
    branch, and quantizers append the nodes they add at the end. Stable: sorted input stays."""
    cache: dict[tuple, set[str]] = {}
    maker = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    waits = [sorted({maker[x] for x in _reads(n, cache) if x in maker}) for n in nodes]
    state = [0] * len(nodes)  # 0 new, 1 on the stack, 2 placed
    order: list[int] = []
    for first in range(len(nodes)):
        stack = [(first, 0)]
        while stack:
            i, k = stack.pop()
            if k == 0:
                if state[i] == 2:
                    continue
                state[i] = 1
            if k < len(waits[i]):
                stack.append((i, k + 1))
                j = waits[i][k]
                if state[j] == 1:
                    raise ExportError(f"internal: the graph being joined has a cycle through "
                                      f"{nodes[j].name or nodes[j].op_type}; expected an acyclic graph. This is a bug "
                                      "in milora: report it with the command line")
                if state[j] == 0:
                    stack.append((j, 0))
            else:
                state[i] = 2
                order.append(i)
    return [nodes[i] for i in order]


def _constant_only(node: onnx.NodeProto, weights: dict[str, onnx.TensorProto]) -> bool:
    """A node that reads only main-graph initializers and has no subgraph (a Cast of a weight:
    onnxruntime folds it into a new initializer once, where it stands)."""
    return (bool(node.input) and all(x in weights for x in node.input if x) and node.op_type != "DequantizeLinear"
            and next(subgraphs(node), None) is None)


def join(parts: dict[str, onnx.ModelProto], like: onnx.ModelProto, route: str) -> onnx.ModelProto:
    """The inverse of split(): one If on route over the (transformed) phases, their initializers
    in the main graph, each once, and a constant-only node both phases hold identically (such as
    the Cast of a float16-stored weight) once in the main graph: in a branch each, onnxruntime
    would fold it into a float32 copy per branch. like: the graph they were split from (its IO
    and names)."""
    graph = like.graph
    weights: dict[str, onnx.TensorProto] = {}
    phases = {}
    for role, label in (("prefill", "then"), ("decode", "else")):
        g = parts[role].graph
        # A DequantizeLinear's constant inputs stay in the branch that reads them: onnxruntime's
        # Q/DQ fusions look a weight up in the node's own graph only (and fail without it).
        local_names = {x for n in g.node if n.op_type == "DequantizeLinear" for x in n.input}
        local = [i for i in g.initializer if i.name in local_names]
        renamed = {}
        for init in g.initializer:
            if init.name in local_names:
                continue
            if init.name in weights and not _same_tensor(weights[init.name], init):
                renamed[init.name] = f"{init.name}/{role}"
            name = renamed.get(init.name, init.name)
            if name not in weights:
                copy = onnx.TensorProto()
                copy.CopyFrom(init)
                copy.name = name
                weights[name] = copy
        nodes = []
        for n in g.node:
            copy_node = onnx.NodeProto()
            copy_node.CopyFrom(n)
            nodes.append(copy_node)
        # A branch may not make a value the main graph makes (its outputs): rename those.
        renamed.update({o.name: f"{o.name}/{label}" for o in g.output})
        _rename_values(nodes, renamed)
        phases[label] = (g, nodes, renamed, local)
    # Serialized, to compare; only the constant-only nodes (few and small) are.
    const = {label: {n.SerializeToString(): n for n in nodes if _constant_only(n, weights)}
             for label, (_, nodes, _, _) in phases.items()}
    hoisted = const["then"].keys() & const["else"].keys()
    shared = [n for key, n in const["else"].items() if key in hoisted]
    bodies = {}
    for label, (g, nodes, renamed, local) in phases.items():
        moved = {id(n) for key, n in const[label].items() if key in hoisted}
        nodes = [n for n in nodes if id(n) not in moved]
        made = {o for n in nodes for o in n.output}
        outs = []
        for o in g.output:
            name = renamed[o.name]
            if name not in made:  # a graph input or initializer passed out as is: a branch must make its outputs
                nodes.append(helper.make_node("Identity", [o.name], [name], name=f"{name}/Identity"))
            outs.append(helper.make_tensor_value_info(name, o.type.tensor_type.elem_type, None))
        made = {o for n in nodes for o in n.output}
        info = [v for v in g.value_info if v.name in made and v.name not in renamed]
        bodies[label] = helper.make_graph(_toposorted(nodes), f"{graph.name}/{label}", [], outs, initializer=local,
                                          value_info=info)
    iff = helper.make_node("If", [route], [o.name for o in graph.output], name=f"{route}/If",
                           then_branch=bodies["then"], else_branch=bodies["else"])
    main = helper.make_graph([*shared, iff], graph.name, list(graph.input), list(graph.output),
                             initializer=list(weights.values()))
    opsets: dict[str, int] = {}
    for m in (like, *parts.values()):
        for op in m.opset_import:
            opsets[op.domain] = max(opsets.get(op.domain, 0), op.version)
    return helper.make_model(main, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                             ir_version=max(m.ir_version for m in (like, *parts.values())))
