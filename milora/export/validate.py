"""Validation of exported graphs against the PyTorch reference (milora.model).

Each row of a case is run alone through its tenant's MiloraModel on its unpadded prompt
(slot 0 rows through the bare HF model), then N decode steps with given tokens. The graphs
run the same rows as one left-padded batch of mixed tenants: prefill, then N decode steps
fed with the graph's own gates and presents. Compared, real positions only:
    gates        expert selections equal wherever the reference margin between the k-th and
                 (k+1)-th router logit exceeds the margin tolerance; a row whose
                 selection differs only at near-ties is reported and not compared further
    gates, logits (prefill: the last position, or every real one when the export keeps all;
                 every decode step), present.* (prefill and last step; every layer's KV at every
                 position checks the hidden states the last-position logits do not show)
                 |graph - ref| <= atol + rtol * |ref|   (milora.format.tolerances, backend onnxruntime)
Every mismatch is collected (output name, row, max error, bound), then one ValidationError.
"""

from __future__ import annotations

import copy
import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from milora.format.contract import NUM_EXPERTS
from milora.errors import ValidationError
from milora.format import feeds as fd
from milora.format import manifest as mf
from milora.format.tolerances import margin, tolerance
from milora.format.pack import assemble_banks, default_slots

PAD_ID = 0


@dataclass
class Row:
    tenant: str | None  # None: slot 0, the base model
    prompt: list[int]
    decode: list[int]  # tokens fed at each decode step (teacher forcing)


@dataclass
class RowRef:
    logits: np.ndarray  # [T, V]
    kv: list[np.ndarray]  # 2L x [Hkv, T, D]
    gates: np.ndarray  # [L, 7]
    margins: np.ndarray  # [L] k-th minus (k+1)-th router logit; inf where not routed
    top_k: int | None = None  # experts a routed tenant selects per layer; None: fixed gates
    decode_logits: list[np.ndarray] = field(default_factory=list)  # N x [V]
    final_kv: list[np.ndarray] = field(default_factory=list)  # 2L x [Hkv, T+N, D]


@dataclass
class Report:
    max_error: dict[str, float] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)
    near_ties: int = 0
    compared_selections: int = 0
    skipped_rows: list[str] = field(default_factory=list)

    def check(self, name: str, got: np.ndarray, ref: np.ndarray, tol: tuple[float, float], where: str) -> None:
        got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
        err = np.abs(got - ref)
        bound = tol[0] + tol[1] * np.abs(ref)
        worst = float(err.max()) if err.size else 0.0
        group = name.split(".")[0] if "/present." in name else name  # one entry for every layer's KV
        self.max_error[group] = max(self.max_error.get(group, 0.0), worst)
        if not np.all(err <= bound) or not np.all(np.isfinite(got)):
            self.mismatches.append(f"{name} ({where}): max error {worst:.3g}, allowed {tol[0]:g} + {tol[1]:g}*|ref|")

    def summary(self) -> dict[str, Any]:
        return {"max_error": {k: float(f"{v:.3g}") for k, v in sorted(self.max_error.items())},
                "near_ties": self.near_ties, "compared_selections": self.compared_selections,
                "skipped_rows": self.skipped_rows}


def _router_logits(model) -> tuple[list, list]:
    """Hooks recording each layer router's logits; returns (handles, per-layer list)."""
    seen: list[torch.Tensor] = []
    handles = [r.register_forward_hook(lambda mod, args, out: seen.append(out[2].detach())) for r in model.routers]
    return handles, seen


def _margins(logits: list[torch.Tensor], k: int, num_layers: int) -> np.ndarray:
    out = np.full(num_layers, np.inf)
    for l, z in enumerate(logits):
        z = torch.sort(z[0].double(), descending=True).values
        if k < z.shape[0]:
            out[l] = float(z[k - 1] - z[k])
    return out


def _kv(cache, num_layers: int) -> list[np.ndarray]:
    return [t[0].float().numpy().copy() for i in range(num_layers) for t in cache[i]]


@torch.no_grad()
def reference_rows(hf_model, tenants: dict[str, Any], rows: list[Row]) -> list[RowRef]:
    """Run every row alone through its tenant's reference model (grouped: one model at a time)."""
    from milora.model.model import MiloraModel

    nl = hf_model.config.num_hidden_layers
    refs: list[RowRef | None] = [None] * len(rows)
    # The tenants' models share the base's weight tensors (MiloraModel freezes them: put the
    # flags back after). A deepcopy per tenant held a second copy of every weight, and more
    # than one at a time until the garbage collector broke the hooks' reference cycles.
    weights = [*hf_model.parameters(), *hf_model.buffers()]
    requires_grad = [t.requires_grad for t in weights]
    try:
        for name in dict.fromkeys(r.tenant for r in rows):
            if name is None:
                model, t = hf_model, None
            else:
                t = tenants[name]
                shared = copy.deepcopy(hf_model, memo={id(w): w for w in weights})  # modules copied, tensors not
                model = MiloraModel(shared, t.config).eval()
                model.load_adapter_state_dict(t.tensors, where=f"tenant {name}")
            for i, row in enumerate(rows):
                if row.tenant == name:
                    refs[i] = _reference_row(model, t, row, nl)
            del model
            gc.collect()
    finally:
        for w, flag in zip(weights, requires_grad):
            w.requires_grad_(flag)
    return refs  # type: ignore[return-value]


def _reference_row(model, tenant, row: Row, nl: int) -> RowRef:
    ids = torch.tensor([row.prompt])
    if tenant is None:  # the bare HF model: slot 0
        out = model(input_ids=ids, use_cache=True)
        gates, margins, routing = np.zeros((nl, NUM_EXPERTS)), np.full(nl, np.inf), None
    else:
        handles, seen = _router_logits(model) if tenant.config.routed else ([], [])
        out = model(ids)
        for h in handles:
            h.remove()
        routing, gates = out.routing, out.routing.gates[0].numpy()
        margins = _margins(seen, tenant.config.top_k, nl) if seen else np.full(nl, np.inf)
    top_k = tenant.config.top_k if tenant is not None and tenant.config.routed else None
    ref = RowRef(out.logits[0].float().numpy(), _kv(out.past_key_values, nl), gates, margins, top_k)
    cache = out.past_key_values
    for tok in row.decode:
        step = torch.tensor([[tok]])
        out = model(input_ids=step, past_key_values=cache, use_cache=True) if tenant is None else \
            model(step, routing=routing, past_key_values=cache)
        cache = out.past_key_values
        ref.decode_logits.append(out.logits[0, -1].float().numpy())
    ref.final_kv = _kv(cache, nl)
    return ref


def sessions(root: Path, manifest: dict[str, Any], python_op: bool = False) -> dict[str, Any]:
    """onnxruntime sessions of both graphs; python_op registers the Python RoutedLora."""
    import onnxruntime as ort

    if python_op:
        from milora.export.pyop import with_python_op

        opts = with_python_op()
    else:
        opts = ort.SessionOptions()
    # Idle onnxruntime threads spin by default, stealing the CPU from the PyTorch reference
    # that runs between graph calls.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    out: dict[str, Any] = {}
    for g in mf.GRAPH_ROLES:  # the fused flavour's one graph is opened once
        out[g] = out.get(mf.graph_of(manifest, g)) or ort.InferenceSession(
            str(root / manifest["graphs"][g]["file"]), sess_options=opts, providers=["CPUExecutionProvider"])
    return out


def run_graphs(root: Path, manifest: dict[str, Any], rows: list[Row], sess: dict[str, Any]) -> dict[str, Any]:
    """Prefill the rows as one batch, then decode len(rows[0].decode) steps, fed as the runtime
    feeds each flavour (milora.format.feeds). The results are laid out as the portable graphs
    lay them out (KV and mask left-padded), so compare() reads both flavours alike."""
    slots = default_slots(manifest)
    banks = assemble_banks(root, manifest, slots)
    slot_of = {name: s for s, name in enumerate(slots) if name is not None}
    tenant_slots = [0 if r.tenant is None else slot_of[r.tenant] for r in rows]
    batch = fd.prefill_feeds(manifest, [r.prompt for r in rows], tenant_slots, banks, pad_id=PAD_ID)
    out = fd.run(sess["prefill"], batch.feeds)
    steps = len(rows[0].decode)
    decoded: list[dict[str, np.ndarray]] = []

    def run_step(feeds):
        decoded.append(fd.run(sess["decode"], feeds))
        return decoded[-1]

    for _ in fd.decode_feeds(manifest, batch, out, banks, steps, lambda s: [r.decode[s] for r in rows], run_step):
        pass
    lens, t = batch.lens, int(batch.lens.max())
    if not fd.is_fused(manifest):  # already the portable layout
        mask = batch.feeds[mf.ATTENTION_MASK]
        return {"mask": mask, "prefill": out, "decode": decoded,
                "final_mask": np.concatenate([mask, np.ones((len(rows), steps), np.int64)], axis=1)}
    kv_names = [n for l in range(manifest["base"]["num_layers"]) for n in (mf.present_key(l), mf.present_value(l))]
    return {"mask": _left_mask(lens, t), "prefill": dict(out, **{n: _left(out[n], lens, t) for n in kv_names}),
            "decode": [dict(o, **{n: _left(o[n], lens + s + 1, t + s + 1) for n in kv_names})
                       for s, o in enumerate(decoded)],
            "final_mask": _left_mask(lens + steps, t + steps)}


def _left(kv: np.ndarray, lens: np.ndarray, width: int) -> np.ndarray:
    """Right-aligned-by-row copy of per-row KV [B, Hkv, >= len, D] (row b's first lens[b] positions),
    left-padded to width: the portable layout."""
    out = np.zeros((kv.shape[0], kv.shape[1], width, kv.shape[3]), kv.dtype)
    for i, n in enumerate(lens):
        out[i, :, width - n:] = kv[i, :, :n]
    return out


def _left_mask(lens: np.ndarray, width: int) -> np.ndarray:
    return (np.arange(width)[None, :] >= (width - lens)[:, None]).astype(np.int64)


def _selection_ok(report: Report, i: int, row: Row, got: np.ndarray, ref: RowRef, margin_tol: float) -> bool:
    """Compare expert selections (gates != 0: a selected gate is never 0, contract.GATE_FLOOR)
    where the reference margin is clear; False if the row's selection differs at a near-tie
    (the row is then skipped, and reported). Non-finite gates or margins are mismatches,
    never near-ties: NaN compares false with every tolerance."""
    where = f"row {i}, tenant {row.tenant}"
    if not (np.isfinite(got).all() and np.isfinite(ref.gates).all() and not np.isnan(ref.margins).any()):
        report.mismatches.append(f"gates ({where}): non-finite values (graph {int((~np.isfinite(got)).sum())}, "
                                 f"reference {int((~np.isfinite(ref.gates)).sum())}); the tenant's adapter or the "
                                 "graph produces NaN/inf routing")
        return False
    flipped = False
    for l in range(got.shape[0]):
        same = np.array_equal(got[l] != 0, ref.gates[l] != 0)
        if ref.top_k is not None and int((got[l] != 0).sum()) != ref.top_k:
            report.mismatches.append(f"gates ({where}, layer {l}): graph selects {int((got[l] != 0).sum())} "
                                     f"experts {np.flatnonzero(got[l]).tolist()}, the tenant's top_k is {ref.top_k}")
        if ref.margins[l] > margin_tol:
            report.compared_selections += 1
            if not same:
                report.mismatches.append(
                    f"gates ({where}, layer {l}): graph selects experts "
                    f"{np.flatnonzero(got[l]).tolist()}, reference {np.flatnonzero(ref.gates[l]).tolist()} "
                    f"(reference margin {ref.margins[l]:.3g} > {margin_tol:g})")
        else:
            report.near_ties += 1
            flipped |= not same
    if flipped:
        report.skipped_rows.append(f"row {i} ({row.tenant}): selection differs at a near-tie")
    return not flipped


def compare(rows: list[Row], refs: list[RowRef], res: dict[str, Any], dtype: str, nl: int) -> Report:
    tol, report = {k: tolerance("onnxruntime", dtype, k) for k in ("logits", "present", "gates")}, Report()
    tol["margin"] = margin("onnxruntime", dtype)
    t = res["mask"].shape[1]
    for i, (row, ref) in enumerate(zip(rows, refs)):
        n, where = len(row.prompt), f"row {i}, tenant {row.tenant}"
        pre = res["prefill"]
        if not _selection_ok(report, i, row, pre[mf.GATES][i], ref, tol["margin"]):
            continue
        report.check(mf.GATES, pre[mf.GATES][i], ref.gates, tol["gates"], where)
        if pre[mf.LOGITS].shape[1] == 1:  # last position only: the present KV below covers the rest
            report.check(f"prefill/{mf.LOGITS}", pre[mf.LOGITS][i, -1], ref.logits[-1], tol["logits"], where)
        else:
            report.check(f"prefill/{mf.LOGITS}", pre[mf.LOGITS][i, t - n:], ref.logits, tol["logits"], where)
        names = [x for l in range(nl) for x in (mf.present_key(l), mf.present_value(l))]
        for name, kv in zip(names, ref.kv):
            report.check(f"prefill/{name}", pre[name][i][:, t - n:], kv, tol["present"], where)
        for s, out in enumerate(res["decode"]):
            report.check(f"decode/{mf.LOGITS}", out[mf.LOGITS][i, -1], ref.decode_logits[s], tol["logits"],
                         f"{where}, step {s}")
        if res["decode"]:
            real = res["final_mask"][i].astype(bool)
            for name, kv in zip(names, ref.final_kv):
                report.check(f"decode/{name}", res["decode"][-1][name][i][:, real], kv, tol["present"], where)
    return report


def validate(root: Path, manifest: dict[str, Any], hf_model, tenants: dict[str, Any], cases: list[list[Row]],
             python_op: bool = False) -> Report:
    """Run every case through the graphs in root and the reference; raise ValidationError
    listing every mismatch, or return the report (max errors, near-ties)."""
    sess = sessions(Path(root), manifest, python_op)
    nl, total = manifest["base"]["num_layers"], Report()
    for rows in cases:
        refs = reference_rows(hf_model, tenants, rows)
        rep = compare(rows, refs, run_graphs(Path(root), manifest, rows, sess), manifest["dtype"], nl)
        for k, v in rep.max_error.items():
            total.max_error[k] = max(total.max_error.get(k, 0.0), v)
        total.mismatches += rep.mismatches
        total.near_ties += rep.near_ties
        total.compared_selections += rep.compared_selections
        total.skipped_rows += rep.skipped_rows
    if total.mismatches:
        shown = "\n  ".join(total.mismatches[:20])
        more = f"\n  ... and {len(total.mismatches) - 20} more" if len(total.mismatches) > 20 else ""
        raise ValidationError(f"the exported graphs disagree with the PyTorch reference "
                              f"({len(total.mismatches)} mismatches, dtype {manifest['dtype']}):\n  {shown}{more}\n"
                              "This is a bug in the exporter or a tolerance too tight for this model: report it "
                              "with the output above")
    return total


def default_cases(tenant_names: list[str], vocab: int, decode_steps: int, real: list[list[int]] | None = None,
                  seed: int = 0) -> list[list[Row]]:
    """Two mixed batches: every tenant plus a base row (real prompts when given, one prompt of
    length 1), then random prompts in reverse tenant order (at most 4 rows)."""
    rng = np.random.default_rng(seed)
    order: list[str | None] = [None, *tenant_names]
    rnd = lambda n: rng.integers(3, vocab, n).tolist()  # noqa: E731
    prompts = [list(p) for p in (real or [])]
    first = []
    for j, name in enumerate(order):
        p = prompts[j % len(prompts)] if prompts else rnd(2 + 3 * j % 7)
        first.append(Row(name, p[:1] if j == 1 else p, rnd(decode_steps)))
    second = [Row(name, rnd(3 + 2 * j), rnd(decode_steps)) for j, name in enumerate(reversed(order[-4:]))]
    return [first, second]


def real_prompts(tokenizer_file: Path, texts: tuple[str, ...]) -> list[list[int]] | None:
    if not tokenizer_file.is_file():
        return None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    return [tok.encode(t).ids for t in texts]
