"""The agreement report: a quantized export against its float32 source, per tenant
(docs/quantization.md, "The report").

Both exports run the same prompts (prefill, then decode steps fed the source's greedy tokens,
each export with its OWN routing, as it would serve). Per tenant:

    routing_agreement      share of (prompt, layer) selections (the set of experts with a
                           non-zero gate) identical in both, over the selections that are not
                           near-ties; None when every selection is a near-tie
    near_ties              selections whose source router margin (k-th minus (k+1)-th router
                           logit among the tenant's experts) is at most near_tie x the row's
                           logit spread: rounding may legitimately pick either, so they are
                           counted apart (near_tie_agreement is their own agreement)
    next_token_agreement   share of positions (last prompt token and each decode step) whose
                           top-1 token is the same
    kl_mean / kl_max       KL(source || quantized) of the next-token distributions, nats
    task_accuracy          {source, quantized} on a small real split (when an eval task is given)

Written as quantization/agreement.json and quantization/agreement.png in QUANT_DIR. A routing
agreement below the threshold refuses the export (AgreementError, nothing written) unless forced.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from milora.calibration.feeds import session
from milora.format import feeds as fd
from milora.calibration import graph as cg
from milora.errors import AgreementError
from milora.format import manifest as mf
from milora.format.contract import EXPERT_INDEX
from milora.format.pack import assemble_banks, default_slots

NEAR_TIE = 0.01  # relative to the spread (std) of the row's router logits
BATCH = 8


def router_logits_session(root: Path, manifest: dict[str, Any]):
    """A session of root's prefill graph that also outputs each layer's router logits (the fused
    graph has them as an output: a plain session)."""
    if any(o["name"] == mf.ROUTER_LOGITS for o in manifest["graphs"]["prefill"]["outputs"]):
        return session(root / manifest["graphs"]["prefill"]["file"]), []
    model = onnx.load(str(root / manifest["graphs"]["prefill"]["file"]), load_external_data=True)
    cg.name_nodes(model.graph)
    plan = cg.plan(model, manifest["base"]["vocab_size"])
    names = [t for t in plan.router_logits if t is not None]
    have = {o.name for o in model.graph.output}
    for t in names:
        if t not in have:
            model.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    return session(model.SerializeToString()), plan.router_logits


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    p, q = _softmax(p_logits), _softmax(q_logits)
    return np.sum(p * (np.log(np.maximum(p, 1e-300)) - np.log(np.maximum(q, 1e-300))), axis=-1)


def margins(z: np.ndarray, experts: np.ndarray, k: int) -> np.ndarray:
    """Router margins [B]: k-th minus (k+1)-th largest logit among the tenant's experts,
    divided by the spread of those logits (inf where the tenant has no (k+1)-th expert)."""
    out = np.full(z.shape[0], np.inf)
    zz = z[:, experts]
    if zz.shape[1] <= k:
        return out
    s = -np.sort(-zz, axis=1)
    spread = np.maximum(zz.std(axis=1), 1e-12)
    return (s[:, k - 1] - s[:, k]) / spread


class _Tally:
    def __init__(self):
        self.same = self.decided = self.ties = self.ties_same = 0
        self.tokens_same = self.tokens = 0
        self.kl: list[float] = []
        self.flips: list[dict[str, Any]] = []

    def summary(self) -> dict[str, Any]:
        return {"routing_agreement": self.same / self.decided if self.decided else None,
                "selections": self.decided + self.ties, "decided": self.decided, "identical": self.same,
                "near_ties": self.ties, "near_tie_agreement": self.ties_same / self.ties if self.ties else None,
                "next_token_agreement": self.tokens_same / self.tokens if self.tokens else None,
                "positions": self.tokens, "kl_mean": float(np.mean(self.kl)) if self.kl else None,
                "kl_max": float(np.max(self.kl)) if self.kl else None, "flips": self.flips[:10]}


def agreement_report(src_dir: Path, quant_dir: Path, manifest: dict[str, Any], opts,
                     prompts: dict[str, list[list[int]]] | None = None, sessions: dict[str, Any] | None = None) -> dict:
    """The report of quant_dir (a complete export directory, possibly the partial one being
    written) against src_dir. prompts: per tenant (default: calibrate.report_prompts)."""
    from milora.calibration.calibrate import report_prompts

    if prompts is None:
        prompts = report_prompts(src_dir, manifest, opts)
    slots = default_slots(manifest)
    banks = assemble_banks(src_dir, manifest, slots)
    nl = manifest["base"]["num_layers"]
    src_prefill, logit_names = router_logits_session(src_dir, manifest)
    sess = sessions or {}
    one = mf.graph_of(manifest, "decode") == "prefill"  # the fused flavour: one graph for both phases
    src = {"prefill": src_prefill, "decode": src_prefill if one else
           sess.get("src_decode") or session(src_dir / manifest["graphs"]["decode"]["file"])}
    qnt = {"prefill": session(quant_dir / manifest["graphs"]["prefill"]["file"])}
    qnt["decode"] = qnt["prefill"] if one else session(quant_dir / manifest["graphs"]["decode"]["file"])
    rows = [(t, p) for t in sorted(prompts) for p in prompts[t]]
    tallies = {t: _Tally() for t in prompts}
    for start in range(0, len(rows), BATCH):
        chunk = rows[start:start + BATCH]
        names = [t for t, _ in chunk]
        batch = fd.prefill_feeds(manifest, [p for _, p in chunk], [manifest["tenants"][t]["slot"] for t in names], banks)
        s_out = fd.run(src["prefill"], batch.feeds)
        q_out = fd.run(qnt["prefill"], batch.feeds)
        _routing(tallies, names, chunk, manifest, s_out, q_out, logit_names, nl, start)
        s_last = fd.last_logits(manifest, s_out[mf.LOGITS], batch.lens)
        q_last = fd.last_logits(manifest, q_out[mf.LOGITS], batch.lens)
        tokens: list[np.ndarray] = []
        s_dec: list[np.ndarray] = []

        def source_token(step: int) -> np.ndarray:  # the source's greedy continuation, fed to both
            tokens.append((s_last if step == 0 else s_dec[step - 1]).argmax(axis=-1))
            return tokens[-1]

        _decode(src["decode"], manifest, batch, s_out, banks, opts.report_steps, source_token, out=s_dec)
        q_dec = _decode(qnt["decode"], manifest, batch, q_out, banks, opts.report_steps, lambda s: tokens[s])
        pairs = [(s_last, q_last)] + list(zip(s_dec, q_dec))
        for s_l, q_l in pairs:
            agree = s_l.argmax(-1) == q_l.argmax(-1)
            kl = _kl(s_l, q_l)
            for i, t in enumerate(names):
                tallies[t].tokens += 1
                tallies[t].tokens_same += int(agree[i])
                tallies[t].kl.append(float(kl[i]))
    per_tenant = {t: tally.summary() for t, tally in tallies.items()}
    for tenant, task in (getattr(opts, "eval_tasks", None) or {}).items():
        if tenant not in manifest["tenants"]:
            from milora.errors import QuantizeError

            raise QuantizeError(f"--eval-task {tenant}={task}: the export has no tenant {tenant!r} (it serves "
                                f"{', '.join(sorted(manifest['tenants']))})")
        per_tenant.setdefault(tenant, _Tally().summary())["task_accuracy"] = {
            "task": task, "source": task_accuracy(src_dir, tenant, task, opts.eval_samples),
            "quantized": task_accuracy(quant_dir, tenant, task, opts.eval_samples)}
    return {"precision": getattr(opts, "precision", None), "near_tie": NEAR_TIE, "steps": opts.report_steps,
            "prompts": {t: len(p) for t, p in prompts.items()}, "tenants": per_tenant,
            "summary": summarize(per_tenant)}


def task_accuracy(root: Path, tenant: str, task: str, n: int) -> dict[str, Any]:
    """Accuracy of tenant on the first n items of task's test split through the runtime."""
    from milora.runtime import Engine
    from milora.runtime.scoring import evaluate_math, evaluate_mc
    from milora.train.data import MATH_TASKS, load_task

    items = load_task(task, "test", limit=n)
    with Engine(root, max_batch=8, verify=False) as engine:
        # scored as milora-eval and the demo score (the runtime's scoring, no torch)
        res = evaluate_math(engine, tenant, items, max_new_tokens=160) if task in MATH_TASKS \
            else evaluate_mc(engine, tenant, items)
        return {"accuracy": res.accuracy, "n": res.n}


def _decode(sess, manifest, batch, prefill_out, banks, steps, tokens, out=None) -> list[np.ndarray]:
    out = [] if out is None else out

    def step(feeds):
        res = fd.run(sess, feeds)
        out.append(res[mf.LOGITS][:, -1].astype(np.float32))
        return res

    for _ in fd.decode_feeds(manifest, batch, prefill_out, banks, steps, tokens, step):
        pass
    return out


def _routing(tallies, names, chunk, manifest, s_out, q_out, logit_names, nl, start) -> None:
    s_sel = s_out[mf.GATES] != 0  # [b, L, 7]
    q_sel = q_out[mf.GATES] != 0
    for i, t in enumerate(names):
        cfg = manifest["tenants"][t].get("config", {})
        if not cfg.get("routed", True):
            continue  # plain LoRA: fixed gates, no choice to flip
        experts = np.array([EXPERT_INDEX[e] for e in cfg.get("experts", list(EXPERT_INDEX))])
        k = int(cfg.get("top_k", 1))
        for layer in range(nl):
            name = logit_names[layer] if layer < len(logit_names) else None
            m = np.inf
            if mf.ROUTER_LOGITS in s_out:  # the fused graph outputs them
                m = float(margins(s_out[mf.ROUTER_LOGITS][i:i + 1, layer], experts, k)[0])
            elif name is not None and name in s_out:
                z = s_out[name].reshape(len(names), -1)
                if z.shape[1] == 7:
                    m = float(margins(z[i:i + 1], experts, k)[0])
            same = bool(np.array_equal(s_sel[i, layer], q_sel[i, layer]))
            tally = tallies[t]
            if m <= NEAR_TIE:
                tally.ties += 1
                tally.ties_same += same
            else:
                tally.decided += 1
                tally.same += same
                if not same:
                    tally.flips.append({"prompt": start + i, "layer": layer, "margin": round(m, 4),
                                        "source": np.nonzero(s_sel[i, layer])[0].tolist(),
                                        "quantized": np.nonzero(q_sel[i, layer])[0].tolist()})


def summarize(per_tenant: dict[str, dict[str, Any]]) -> dict[str, Any]:
    routing = [v["routing_agreement"] for v in per_tenant.values() if v["routing_agreement"] is not None]
    tokens = [v["next_token_agreement"] for v in per_tenant.values() if v["next_token_agreement"] is not None]
    kl = [v["kl_mean"] for v in per_tenant.values() if v["kl_mean"] is not None]
    worst = min(per_tenant, key=lambda t: (per_tenant[t]["routing_agreement"] is None,
                                           per_tenant[t]["routing_agreement"] or 0.0), default=None)
    return {"routing_agreement_min": min(routing) if routing else None, "worst_tenant": worst,
            "next_token_agreement_min": min(tokens) if tokens else None,
            "kl_mean_max": max(kl) if kl else None,
            "per_tenant": {t: {k: v[k] for k in ("routing_agreement", "near_ties", "next_token_agreement", "kl_mean",
                                                 "task_accuracy") if k in v} for t, v in per_tenant.items()}}


def check_agreement(report: dict[str, Any], threshold: float, force: bool, precision: str | None = None) -> None:
    """AgreementError when a tenant's routing agreement is below threshold (unless force)."""
    below = {t: v for t, v in report["tenants"].items()
             if v["routing_agreement"] is not None and v["routing_agreement"] < threshold}
    report["summary"]["threshold"] = threshold
    report["summary"]["below_threshold"] = sorted(below)
    report["summary"]["forced"] = bool(below) and force
    if not below or force:
        return
    parts = [f"{t} {v['routing_agreement']:.4f} ({v['identical']}/{v['decided']} (prompt, layer) selections "
             f"identical, {v['near_ties']} near-ties counted apart; next-token agreement "
             f"{v['next_token_agreement']:.4f}, KL {v['kl_mean']:.3g})" for t, v in sorted(below.items())]
    raise AgreementError(f"{precision or 'the quantized'} export's routing agreement with the float32 source is below "
                         f"the threshold {threshold}: {'; '.join(parts)}; nothing was written. Fix: try a higher "
                         "precision (int8-weight, --keep-float / --auto-keep for mixed precision, int4 with --block-size 16), or pass "
                         "--force-agreement to write it anyway (the report goes with it)", report=report)


def write_report(report: dict[str, Any], where: Path) -> list[Path]:
    """agreement.json and, when matplotlib is installed, agreement.png."""
    where.mkdir(parents=True, exist_ok=True)
    paths = [where / "agreement.json"]
    paths[0].write_text(json.dumps(report, indent=2, default=float) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return paths
    tenants = sorted(report["tenants"])
    x = np.arange(len(tenants))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(6, 1.2 * len(tenants) + 4), 3.6))
    route = [report["tenants"][t]["routing_agreement"] for t in tenants]
    token = [report["tenants"][t]["next_token_agreement"] for t in tenants]
    a1.bar(x - 0.2, [np.nan if v is None else v for v in route], 0.4, label="routing")
    a1.bar(x + 0.2, [np.nan if v is None else v for v in token], 0.4, label="next token (top-1)")
    thr = report["summary"].get("threshold")
    if thr is not None:
        a1.axhline(thr, color="red", lw=0.8, ls="--", label=f"threshold {thr}")
    a1.set_xticks(x, tenants, rotation=30, ha="right")
    a1.set_ylim(0, 1.05)
    a1.set_title(f"agreement with float32 ({report.get('precision')})")
    a1.legend(fontsize=7, loc="lower left")
    a2.bar(x, [report["tenants"][t]["kl_mean"] or 0.0 for t in tenants], 0.6, color="gray")
    a2.set_xticks(x, tenants, rotation=30, ha="right")
    a2.set_title("mean KL(float32 || quantized), nats")
    fig.tight_layout()
    fig.savefig(where / "agreement.png", dpi=100)
    plt.close(fig)
    paths.append(where / "agreement.png")
    return paths
