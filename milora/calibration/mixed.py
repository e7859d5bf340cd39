"""Mixed precision: the weight MatMuls that stay float32 in a quantized export
(docs/quantization.md, "Mixed precision").

Each weight MatMul of a graph gets a site name, read from the graph's structure (never from
node names, which differ between flavours and even between an export's prefill and decode
graphs): `layers.L.MODULE`, or `lm_head`. L counts the decoder layers in graph order (each
layer holds the same number of weight MatMuls); MODULE is the Llama module the MatMul computes,
told apart by its weight's shape and its place in the layer:

    portable   q_proj k_proj v_proj o_proj gate_proj up_proj down_proj   (7 per layer)
    fused      qkv_proj o_proj gate_up_proj down_proj                    (4 per layer)

A graph whose layers do not read as either (another architecture) names its MatMuls
`layers.L.matmulJ` (J: the place in the layer).

--keep-float SELECTOR picks sites by name; a selector is dot-separated parts, each either
`layers.RANGE` (RANGE: `3`, `0-5`, `0,2,7-9`) or a module: one of the names above, `attn`
(q, k, v, o), `mlp` (gate, up, down), `lm_head`. A module of the portable flavour matches the
fused MatMul that computes it (`q_proj` keeps the fused `qkv_proj`). Examples: `down_proj`
(every layer's), `layers.0-3` (every MatMul of the first four layers), `layers.0-3.mlp`,
`lm_head`. A selector that matches no weight MatMul is refused (QuantizeError).

The automatic search (--auto-keep) is search_keep_float below.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

import onnx

from milora.calibration import graph as cg
from milora.errors import QuantizeError

PORTABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
# what each fused MatMul computes, and the groups a selector may name
COMPUTES = {"qkv_proj": {"q_proj", "k_proj", "v_proj", "qkv_proj"},
            "gate_up_proj": {"gate_proj", "up_proj", "gate_up_proj"}}
GROUPS = {"attn": {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj"},
          "mlp": {"gate_proj", "up_proj", "down_proj", "gate_up_proj"}}
MODULES = set(PORTABLE) | set(FUSED) | set(GROUPS) | {"lm_head", "embedding"}


def _expected_shapes(base: dict[str, Any]) -> dict[str, tuple[int, int]]:
    h, nl = base["hidden_size"], base.get("num_heads")
    hd = base.get("head_dim") or (h // nl if nl else None)
    kv, inter = base.get("num_kv_heads") or nl, base.get("intermediate_size")
    if not (nl and hd and kv and inter):
        return {}
    q, k = nl * hd, kv * hd
    return {"q_proj": (h, q), "k_proj": (h, k), "v_proj": (h, k), "o_proj": (q, h), "gate_proj": (h, inter),
            "up_proj": (h, inter), "down_proj": (inter, h), "qkv_proj": (h, q + 2 * k),
            "gate_up_proj": (h, 2 * inter)}


def _shape(g: cg.Graph, node: onnx.NodeProto) -> tuple[int, int]:
    dims = tuple(g.initializers[node.input[1]].dims)
    if node.op_type == "Gemm" and any(a.name == "transB" and a.i == 1 for a in node.attribute):
        dims = dims[::-1]
    return dims  # (K, N): in, out


def sites(model: onnx.ModelProto, plan: cg.Plan, base: dict[str, Any]) -> dict[str, str]:
    """{site name: node name} for the embedding Gather and every weight MatMul of plan (nodes
    named by cg.name_nodes), in graph order but the LM head first."""
    g = cg.Graph(model)
    by_name = {n.name: n for n in model.graph.node}
    out = {"embedding": n for n in plan.embedding[:1]} | {"lm_head": n for n in plan.lm_head[:1]}
    decoder = [n for n in plan.weight_matmuls if n not in plan.lm_head]
    layers = base.get("num_layers") or 0
    if not decoder:
        return out
    per = len(decoder) // layers if layers and len(decoder) % layers == 0 else 0
    expected = _expected_shapes(base)
    names: tuple[str, ...] | None = None
    for candidate in (PORTABLE, FUSED):
        if per == len(candidate) and expected and all(
                _shape(g, by_name[n]) == expected[candidate[i % per]] for i, n in enumerate(decoder)):
            names = candidate
            break
    if not per:  # layers not recognized: one group per MatMul, numbered in graph order
        return out | {f"matmul{i}": n for i, n in enumerate(decoder)}
    for i, node in enumerate(decoder):
        module = names[i % per] if names else f"matmul{i % per}"
        out[f"layers.{i // per}.{module}"] = node
    return out


def _parse_range(text: str, selector: str) -> set[int]:
    out: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise QuantizeError(f"--keep-float {selector!r}: layer range {text!r} is malformed; expected layers.N, "
                                "layers.A-B or layers.A,B-C (e.g. layers.0-3.down_proj)")
        out.update(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))
    return out


def parse_selector(selector: str) -> tuple[set[int] | None, set[str] | None]:
    """A selector -> (layers or None for all, modules or None for all)."""
    parts = [p for p in selector.strip().split(".") if p]
    if parts[:1] == ["model"]:  # model.layers.3.mlp.down_proj, as the checkpoint names it
        parts = parts[1:]
    layers: set[int] | None = None
    modules: set[str] | None = None
    i = 0
    while i < len(parts):
        p = parts[i]
        if p == "layers" and i + 1 < len(parts):
            rng = _parse_range(parts[i + 1], selector)
            layers = rng if layers is None else layers & rng
            i += 2
            continue
        if p in ("self_attn",):  # checkpoint spelling of the attention block
            p = "attn"
        if p in MODULES or re.fullmatch(r"matmul\d+", p):
            want = GROUPS.get(p, {p})
            modules = want if modules is None else modules & want  # mlp.down_proj: down_proj
            i += 1
            continue
        raise QuantizeError(f"--keep-float {selector!r}: {p!r} is neither layers.RANGE nor a module; expected "
                            "dot-separated layers.RANGE and a module (q_proj, k_proj, v_proj, o_proj, gate_proj, "
                            "up_proj, down_proj, qkv_proj, gate_up_proj, attn, mlp, lm_head, embedding), e.g. "
                            "layers.0-3.down_proj")
    if layers is None and modules is None:
        raise QuantizeError(f"--keep-float {selector!r} selects nothing; expected layers.RANGE and/or a module, "
                            "e.g. down_proj or layers.0-3")
    return layers, modules


def _site_matches(site: str, layers: set[int] | None, modules: set[str] | None) -> bool:
    if site in ("lm_head", "embedding"):
        return layers is None and modules is not None and site in modules
    m = re.fullmatch(r"layers\.(\d+)\.(\w+)", site)
    if m is None:  # matmulJ of an unrecognized graph
        return layers is None and modules is not None and site in modules
    layer, module = int(m.group(1)), m.group(2)
    if layers is not None and layer not in layers:
        return False
    if modules is None:
        return True
    return bool(COMPUTES.get(module, {module}) & modules)


def select(site_names: Iterable[str], selectors: Iterable[str]) -> list[str]:
    """The site names the selectors pick (in site order); QuantizeError for a selector that
    picks none (a typo would otherwise quantize everything silently)."""
    site_names = list(site_names)
    picked: set[str] = set()
    for sel in selectors:
        layers, modules = parse_selector(sel)
        hit = {s for s in site_names if _site_matches(s, layers, modules)}
        if not hit:
            raise QuantizeError(f"--keep-float {sel!r} matches no weight MatMul of this export; its weight MatMuls "
                                f"are {_describe(site_names)}. Fix: pick from those (e.g. down_proj, layers.0-3, "
                                "lm_head, embedding)")
        picked |= hit
    return [s for s in site_names if s in picked]


def _describe(site_names: list[str]) -> str:
    layers = sorted({int(m.group(1)) for s in site_names if (m := re.fullmatch(r"layers\.(\d+)\.\w+", s))})
    modules = list(dict.fromkeys(s.split(".")[-1] for s in site_names if s.startswith("layers.")))
    out = []
    if layers:
        out.append(f"layers.{layers[0]}-{layers[-1]}.{{{','.join(modules)}}}")
    out += [s for s in site_names if not s.startswith("layers.")][:6]
    return ", ".join(out) if out else "none"


def check_options(opts) -> None:
    """--keep-float / --auto-keep, before anything is read (the selectors' grammar only: what
    they match is checked against each graph)."""
    for sel in opts.keep_float:
        parse_selector(sel)
    if opts.auto_keep and not opts.report:
        raise QuantizeError("--auto-keep searches for the weight MatMuls to keep float32 until the routing agreement "
                            "reaches --threshold, and --no-report skips that measure; expected one of them. Fix: drop "
                            "--no-report")
    if opts.auto_keep and opts.precision == "fp16":
        raise QuantizeError("--auto-keep with --precision fp16: fp16 stores weights float16 and computes float32, "
                            "there is nothing to search. Fix: use --auto-keep with int8-dynamic, int8-static, int8-weight or int4")


def keep_float(model: onnx.ModelProto, plan: cg.Plan, base: dict[str, Any],
               selectors: Iterable[str]) -> tuple[list[str], int]:
    """Take the sites the selectors pick out of plan.weight_matmuls and plan.embedding (they
    stay float32); returns their site names and their float32 weight bytes."""
    named = sites(model, plan, base)
    picked = select(named, selectors)
    nodes = {named[s] for s in picked}
    plan.weight_matmuls = [n for n in plan.weight_matmuls if n not in nodes]
    plan.embedding = [n for n in plan.embedding if n not in nodes]
    by_name = {n.name: n for n in model.graph.node}
    inits = {t.name: t for t in model.graph.initializer}
    size = 0
    for n in nodes:
        node = by_name[n]
        dims = inits[node.input[0] if node.op_type == "Gather" else node.input[1]].dims
        size += 4 * int(dims[0]) * int(dims[1])
    return picked, size


def compress(site_names: list[str], all_sites: list[str]) -> list[str]:
    """Site names as short selectors: whole layers as layers.A-B, the rest one by one (in
    all_sites' order)."""
    per_layer: dict[int, list[str]] = {}
    for s in all_sites:
        m = re.fullmatch(r"layers\.(\d+)\.\w+", s)
        if m:
            per_layer.setdefault(int(m.group(1)), []).append(s)
    chosen = set(site_names)
    whole = [l for l, ss in sorted(per_layer.items()) if set(ss) <= chosen]
    out, start = [], None
    for i, l in enumerate(whole):
        if start is None:
            start = l
        if i + 1 == len(whole) or whole[i + 1] != l + 1:
            out.append(f"layers.{start}" if start == l else f"layers.{start}-{l}")
            start = None
    covered = {s for l in whole for s in per_layer[l]}
    return out + [s for s in all_sites if s in chosen and s not in covered]


def search_keep_float(out_dir, src: dict[str, Any], opts, calib, scratch) -> dict[str, Any]:
    """--auto-keep: the fewest leading weight MatMuls (layer 0's first, in graph order) to keep
    float32 so that every tenant's routing agreement on the prefill reaches opts.threshold.

    Why leading: a router reads the hidden state that every earlier layer wrote, so rounding in
    layer l disturbs the routers of layers l..L-1; on SmolLM2 keeping the first 10 layers float
    kept far more selections than keeping the last 10 (docs/quantization.md). The agreement is
    measured as the report measures it (prefill selections, near-ties apart) but on prompts held
    out from the report's (the calibration side: the train half of a JSONL file or a task's
    train split; other seeds for random prompts), so the report stays an independent check.
    Binary search on the number kept, assuming more float32 never hurts: about log2(#MatMuls)
    quantizations of the prefill graph. A --keep-float list is kept in any case."""
    import copy

    from milora.calibration import calibrate
    from milora.calibration.agreement import _routing, _Tally, router_logits_session
    from milora.calibration.feeds import session
    from milora.calibration.quantize import quantize_graph
    from milora.export.branches import split
    from milora.format import feeds as fd
    from milora.format import manifest as mf
    from milora.format.pack import assemble_banks, default_slots

    n = opts.report_prompts
    if opts.calibration:
        prompts = calibrate._text_prompts(out_dir, src, opts.calibration, "train", n, opts.seed)
    else:
        prompts = calibrate._random_prompts(src, n, opts.seed + 7)
    banks = assemble_banks(out_dir, src, default_slots(src))
    rows = [(t, p) for t in sorted(prompts) for p in prompts[t]]
    batches = []
    for s in range(0, len(rows), 8):
        chunk = rows[s:s + 8]
        batches.append((s, [t for t, _ in chunk],
                        fd.prefill_feeds(src, [p for _, p in chunk], [src["tenants"][t]["slot"] for t, _ in chunk],
                                         banks)))
    src_sess, logit_names = router_logits_session(out_dir, src)
    src_out = [fd.run(src_sess, b.feeds, [mf.GATES, *[x for x in logit_names if x]]) for _, _, b in batches]
    del src_sess
    base_model = onnx.load(str(out_dir / src["graphs"]["prefill"]["file"]), load_external_data=True)
    base_model = (split(base_model, mf.ROUTE) or {"prefill": base_model})["prefill"]  # fused: its prefill phase
    cg.name_nodes(base_model.graph)
    plan = cg.plan(base_model, src["base"]["vocab_size"])
    named = sites(base_model, plan, src["base"])
    # the embedding first (it feeds layer 0), then the layers; the LM head reads no router
    chain = [s for s in named if s != "lm_head" and (s != "embedding" or opts.quantizes_embedding)]
    nl = src["base"]["num_layers"]
    lead = int(bool(chain) and chain[0] == "embedding")
    trials: list[dict[str, Any]] = []

    def agreement(k: int) -> dict[str, float | None]:
        keep = list(opts.keep_float) + chain[:k]
        trial_opts = copy.copy(opts)
        trial_opts.keep_float, trial_opts.auto_keep = keep, False
        model, _ = quantize_graph(copy.deepcopy(base_model), "prefill", src, trial_opts, calib, scratch)
        path = scratch / ".auto-keep.onnx"
        onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")
        del model
        sess = session(path)
        tallies = {t: _Tally() for t in prompts}
        for (start, names, b), s_out in zip(batches, src_out):
            q_out = fd.run(sess, b.feeds, [mf.GATES])
            _routing(tallies, names, list(zip(names, b.prompts)), src, s_out, q_out, logit_names, nl, start)
        del sess
        for p in (path, path.with_name(path.name + ".data")):
            p.unlink(missing_ok=True)
        per = {t: v.summary()["routing_agreement"] for t, v in tallies.items()}
        decided = [v for v in per.values() if v is not None]
        trials.append({"kept": k, "routing_agreement": per, "min": min(decided) if decided else None})
        return per

    def ok(per: dict[str, float | None]) -> bool:
        return all(v is None or v >= opts.threshold for v in per.values())

    lo, hi = 0, len(chain)  # invariant: hi passes (all float32 is the source itself), lo unknown
    if ok(agreement(0)):
        hi = 0
    else:
        # layer granularity first, then MatMul by MatMul inside the last layer
        step = max(1, (len(chain) - lead) // nl) if nl else 1  # weight MatMuls per layer
        lo_l, hi_l = 0, -(-(len(chain) - lead) // step)  # whole layers (with the embedding) kept
        while hi_l - lo_l > 1:
            mid = (lo_l + hi_l) // 2
            if ok(agreement(lead + mid * step)):
                hi_l = mid
            else:
                lo_l = mid
        lo, hi = (lead + lo_l * step) if lo_l else 0, min(lead + hi_l * step, len(chain))
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if ok(agreement(mid)):
                hi = mid
            else:
                lo = mid
    measured = {t["kept"]: t for t in trials}
    if hi not in measured:  # every decoder MatMul float32: the embedding may still flip choices
        agreement(hi)
        measured = {t["kept"]: t for t in trials}
    reached = ok(measured[hi]["routing_agreement"])
    kept = chain[:hi]
    return {"method": "binary search on the leading weight MatMuls (layer order) kept float32",
            "prompts_per_tenant": {t: len(p) for t, p in prompts.items()},
            "prompts": "calibration side (held out from the report)", "threshold": opts.threshold,
            "trials": trials, "kept": hi, "of": len(chain), "reached": reached,
            "keep_float": list(opts.keep_float) + compress(kept, chain)}
