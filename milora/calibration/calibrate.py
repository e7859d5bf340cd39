"""Calibration and report data (docs/quantization.md, "Calibration data").

Prompts come from, in this order of preference:
    --calibration FILE.jsonl   one JSON object per line: {"prompt": text} (or "text", or
                               "messages": chat turns), optionally "tenant": name to give it
                               to one tenant only (else every tenant gets it)
    --calibration TASK         a built-in task (milora.train.data.TASKS): its train split for
                               calibration, its dev split for the report
    neither                    random token prompts (seeded): enough for tiny test models,
                               not for a real deployment (the command says so)

Text prompts are rendered with the export's chat template when it has one (the prompts the
tenants see in serving) and tokenized with the export's tokenizer; no torch.

Routing-aware selection (calibration_set): from a pool of candidates per tenant, the source
export's prefill is run and each candidate's routing read (which experts each layer selects for
that tenant); prompts are then picked greedily so that every (tenant, layer, expert) path used
anywhere in the pool is exercised at least once, then round-robin across tenants up to
calib_samples. Prefill batches mix tenants; decode-graph calibration feeds are the decode
steps that follow those real prefill runs (their KV, their gates, greedy next tokens).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from milora.calibration.feeds import session
from milora.format import feeds as fd
from milora.errors import QuantizeError
from milora.format import manifest as mf
from milora.format.pack import assemble_banks, default_slots

POOL_FACTOR = 3  # candidates per tenant: this many times its share of calib_samples
CALIB_BATCH = 4
MAX_PROMPT_TOKENS = 256


def _bundle(out_dir: Path):
    from milora.runtime.bundle import Bundle

    try:
        return Bundle.open(out_dir, verify=False)
    except Exception as exc:  # noqa: BLE001 - a missing tokenizer: say what is needed
        raise QuantizeError(f"text calibration prompts need the export's tokenizer, which {out_dir} lacks ({exc}); "
                            "expected tokenizer.json beside the graphs. Fix: export from a model directory with "
                            "its tokenizer, or omit --calibration (random token prompts)") from None


def _encode(bundle, text: str | None, messages: list | None) -> list[int]:
    if messages is None and bundle.chat_template:
        messages = [{"role": "user", "content": text}]
    rendered = bundle.apply_chat_template(messages) if messages is not None else text + "\n"
    return bundle.encode(rendered)[-MAX_PROMPT_TOKENS:]


def read_prompts_jsonl(path: Path, tenants: list[str]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {t: [] for t in tenants}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise QuantizeError(f"cannot read calibration file {path}: {exc}; expected a UTF-8 JSONL file of prompts") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise QuantizeError(f"{path}:{i} is not JSON ({exc.msg}); expected one object per line such as "
                                '{"prompt": "...", "tenant": "acme"}. Fix: correct that line') from None
        text = rec.get("prompt", rec.get("text")) if isinstance(rec, dict) else None
        messages = rec.get("messages") if isinstance(rec, dict) else None
        if not (isinstance(text, str) and text) and not (isinstance(messages, list) and messages):
            raise QuantizeError(f"{path}:{i} has no prompt; expected a non-empty \"prompt\" (or \"text\") string or "
                                "a \"messages\" list. Fix: add one or remove the line")
        tenant = rec.get("tenant")
        if tenant is not None and tenant not in out:
            raise QuantizeError(f"{path}:{i} names tenant {tenant!r}, which the export lacks (it serves "
                                f"{', '.join(tenants)}). Fix: correct the name or drop \"tenant\" to give it to all")
        for t in ([tenant] if tenant else tenants):
            out[t].append({"text": text if isinstance(text, str) else None,
                           "messages": messages if isinstance(messages, list) else None})
    empty = [t for t, v in out.items() if not v]
    if empty:
        raise QuantizeError(f"{path} gives no prompt to tenant(s) {', '.join(empty)}; every tenant needs calibration "
                            "prompts. Fix: add lines for them or lines without \"tenant\"")
    return out


def _text_prompts(out_dir: Path, manifest: dict[str, Any], source: str, split: str, n: int,
                  seed: int) -> dict[str, list[list[int]]]:
    tenants = sorted(manifest["tenants"])
    path = Path(source)
    if path.suffix in (".jsonl", ".json") or path.is_file():
        if not path.is_file():
            raise QuantizeError(f"calibration file {path} does not exist; expected a JSONL file of prompts or a "
                                "built-in task name")
        recs = read_prompts_jsonl(path, tenants)
        rng = np.random.default_rng(seed)
        # calibration and report draw from disjoint halves when there are enough lines
        picked = {}
        for t, r in recs.items():
            order = rng.permutation(len(r)).tolist()
            half = order[:len(order) // 2] if split == "train" and len(order) > 1 else \
                (order[len(order) // 2:] if len(order) > 1 else order)
            picked[t] = [r[i] for i in half[:n]]
    else:
        from milora.train.data import TASKS, load_task

        if source not in TASKS:
            raise QuantizeError(f"--calibration {source!r} is neither a file nor a built-in task; expected a JSONL "
                                f"file or one of {', '.join(TASKS)}")
        items = load_task(source, split, limit=n * 2)
        picked = {t: [{"text": e.prompt, "messages": None} for e in items[:n]] for t in tenants}
    bundle = _bundle(out_dir)
    return {t: [ids for ids in (_encode(bundle, r["text"], r["messages"]) for r in recs) if ids]
            for t, recs in picked.items()}


def _random_prompts(manifest: dict[str, Any], n: int, seed: int) -> dict[str, list[list[int]]]:
    vocab = manifest["base"]["vocab_size"]
    rng = np.random.default_rng(seed)
    top = min(24, (manifest["base"].get("max_position_embeddings") or 64) // 2)
    return {t: [rng.integers(3, vocab, size=int(rng.integers(3, top))).tolist() for _ in range(n)]
            for t in sorted(manifest["tenants"])}


def report_prompts(out_dir: Path, manifest: dict[str, Any], opts) -> dict[str, list[list[int]]]:
    """Prompts per tenant for the agreement report (held out from calibration)."""
    if opts.calibration:
        split = "dev"
        return _text_prompts(out_dir, manifest, opts.calibration, split, opts.report_prompts, opts.seed + 1)
    return _random_prompts(manifest, opts.report_prompts, opts.seed + 1)


@dataclass
class CalibrationSet:
    """The feeds onnxruntime's calibrator reads, per graph, and what they cover."""

    prefill: list[dict[str, np.ndarray]] = field(default_factory=list)
    decode: list[dict[str, np.ndarray]] = field(default_factory=list)
    coverage: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, set[str]] = field(default_factory=dict)

    def both_phases(self) -> "CalibrationSet":
        """Every feed for either graph: for one graph that serves both phases and cannot be taken
        apart into them (a fused export written with an If per layer; milora-quantize
        quantizes today's fused graph one phase at a time, each on its own feeds)."""
        items = self.prefill + self.decode
        return dataclasses.replace(self, prefill=items, decode=items)

    def reader(self, graph: str):
        from onnxruntime.quantization import CalibrationDataReader

        items = self.prefill if graph == "prefill" else self.decode
        wanted = self.inputs[graph]

        class Reader(CalibrationDataReader):
            def __init__(self):
                self._it = iter(items)

            def get_next(self):
                nxt = next(self._it, None)
                return None if nxt is None else {k: v for k, v in nxt.items() if k in wanted}

            def rewind(self):
                self._it = iter(items)

        return Reader()


def paths_of(gates: np.ndarray) -> set[tuple[int, int]]:
    """(layer, expert) pairs selected in one row's gates [L, 7]."""
    return {(int(l), int(e)) for l, e in zip(*np.nonzero(gates != 0))}


def select_routing_aware(paths: dict[str, list[set]], budget: int) -> dict[str, list[int]]:
    """Indices of the chosen candidates per tenant: first a greedy cover of every (layer,
    expert) path seen in the tenant's pool, then round-robin across tenants up to budget."""
    chosen: dict[str, list[int]] = {t: [] for t in paths}
    for t, cands in paths.items():
        need = set().union(*cands) if cands else set()
        while need:
            best = max(range(len(cands)), key=lambda i: (len(cands[i] & need), -i))
            if not cands[best] & need:
                break
            chosen[t].append(best)
            need -= cands[best]
    total = sum(len(v) for v in chosen.values())
    rest = {t: [i for i in range(len(c)) if i not in chosen[t]] for t, c in paths.items()}
    while total < budget and any(rest.values()):
        for t in sorted(rest):
            if rest[t] and total < budget:
                chosen[t].append(rest[t].pop(0))
                total += 1
    return chosen


def calibration_set(out_dir: Path, manifest: dict[str, Any], opts, uniform: bool = False) -> CalibrationSet:
    """uniform: every batch the same shape (CALIB_BATCH rows, padded to the longest prompt):
    onnxruntime's Distribution calibrator (fp8) stacks the batches it collects."""
    tenants = sorted(manifest["tenants"])
    if not tenants:
        raise QuantizeError(f"{out_dir} serves no tenant; routing-aware calibration needs at least one. Fix: export "
                            "with tenants, or use --precision int8-dynamic / int4 (no calibration)")
    per = max(1, -(-opts.calib_samples // len(tenants)))
    pool_n = per * POOL_FACTOR
    if opts.calibration:
        pool = _text_prompts(out_dir, manifest, opts.calibration, "train", pool_n, opts.seed)
    else:
        pool = _random_prompts(manifest, pool_n, opts.seed)
    slots = default_slots(manifest)
    banks = assemble_banks(out_dir, manifest, slots)
    prefill = session(out_dir / manifest["graphs"]["prefill"]["file"])
    decode = prefill if mf.graph_of(manifest, "decode") == "prefill" else \
        session(out_dir / manifest["graphs"]["decode"]["file"])  # the fused flavour's one graph: opened once
    # the routing of every candidate, per tenant (batched by tenant)
    paths: dict[str, list[set]] = {}
    for t in tenants:
        paths[t] = []
        for s in range(0, len(pool[t]), 8):
            chunk = pool[t][s:s + 8]
            b = fd.prefill_feeds(manifest, chunk, [manifest["tenants"][t]["slot"]] * len(chunk), banks)
            g = fd.run(prefill, b.feeds, [mf.GATES])[mf.GATES]
            paths[t] += [paths_of(g[i]) for i in range(len(chunk))]
    chosen = select_routing_aware(paths, opts.calib_samples)
    used = {t: set().union(*paths[t]) if paths[t] else set() for t in tenants}
    covered = {t: set().union(*(paths[t][i] for i in chosen[t])) if chosen[t] else set() for t in tenants}
    # mixed-tenant batches: interleave the chosen rows across tenants
    rows = []
    queues = {t: [pool[t][i] for i in chosen[t]] for t in tenants}
    while any(queues.values()):
        for t in tenants:
            if queues[t]:
                rows.append((t, queues[t].pop(0)))
    if uniform and rows:
        while len(rows) % CALIB_BATCH:
            rows.append(rows[len(rows) % len(rows)])
    longest = max(len(p) for _, p in rows) if uniform and rows else None
    cs = CalibrationSet(inputs={g: {i["name"] for i in manifest["graphs"][g]["inputs"]} for g in mf.GRAPH_ROLES})
    for s in range(0, len(rows), CALIB_BATCH):
        chunk = rows[s:s + CALIB_BATCH]
        b = fd.prefill_feeds(manifest, [p for _, p in chunk], [manifest["tenants"][t]["slot"] for t, _ in chunk], banks,
                             length=longest)
        cs.prefill.append(b.feeds)
        out = fd.run(prefill, b.feeds)
        last = fd.last_logits(manifest, out[mf.LOGITS], b.lens)
        logits = [last]

        def step(feeds, _logits=logits):
            res = fd.run(decode, feeds)
            _logits.append(res[mf.LOGITS][:, -1])
            return res

        for feeds in fd.decode_feeds(manifest, b, out, banks, opts.calib_decode_steps,
                                     lambda k, _l=logits: _l[k].argmax(axis=-1), step):
            # the step's own arrays are copied (KV buffers are reused); the banks are shared
            cs.decode.append({k: v if k in banks else np.array(v, copy=True) for k, v in feeds.items()})
    if uniform and cs.decode and not fd.is_fused(manifest):
        _left_pad_decode(cs.decode, manifest["base"]["num_layers"])
    cs.coverage = {"source": opts.calibration or "random token prompts", "samples": len(rows),
                   "prefill_batches": len(cs.prefill), "decode_steps": len(cs.decode),
                   "paths_used": {t: len(used[t]) for t in tenants},
                   "paths_covered": {t: len(covered[t]) for t in tenants},
                   "per_tenant": {t: len(chosen[t]) for t in tenants}}
    return cs


def _left_pad_decode(feeds: list[dict[str, np.ndarray]], num_layers: int) -> None:
    """Portable decode feeds padded on the left to one past length (the mask hides the padding):
    every attention tensor then has one shape across steps."""
    names = [n for l in range(num_layers) for n in (mf.past_key(l), mf.past_value(l))]
    longest = max(f[names[0]].shape[2] for f in feeds)
    for f in feeds:
        pad = longest - f[names[0]].shape[2]
        if pad:
            for n in names:
                f[n] = np.pad(f[n], ((0, 0), (0, 0), (pad, 0), (0, 0)))
            f[mf.ATTENTION_MASK] = np.pad(f[mf.ATTENTION_MASK], ((0, 0), (pad, 0)))
