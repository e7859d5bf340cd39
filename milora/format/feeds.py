"""Feeding an export's graphs (numpy in, numpy out), for both graph flavours: the sequence
the runtime runs (milora/runtime/ort_backend.py, fused_backend.py), spelled out for the
export's validation, the int8-static calibration reader and the quantization agreement report,
which all run the graphs on explicit feeds. A prefill of mixed tenants, then decode steps fed
each row's next token, so the decode graph sees KV produced by real prefill runs.

Shape legend: B rows, T prompt tokens, L layers, Hkv KV heads, D head dim, V vocab.

    portable  prefill left-padded; decode takes the gates, the banks, a [B, P+1] mask and the
              past KV concatenated (present = concat(past, new))
    fused     one graph: prefill (route true) right-padded into KV buffers of a fixed capacity
              written in place, no LoRA inputs (the graph routes and builds its own); decode
              (route false) takes per-row lengths (seqlens_k), the buffers and the per-batch
              LoRA inputs (format/lora_batch)

Torch- and onnxruntime-free: `run` takes any session with onnxruntime's run() and
get_inputs()/get_outputs().
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from milora.format import manifest as mf
from milora.format.padding import left_pad, right_pad


def is_fused(manifest: dict[str, Any]) -> bool:
    return manifest.get("flavour") == mf.FLAVOUR_FUSED


@dataclass
class Batch:
    """One prefill batch and what its decode steps need."""

    prompts: list[list[int]]
    slots: np.ndarray  # [B] int64
    feeds: dict[str, np.ndarray] = field(default_factory=dict)
    lens: np.ndarray | None = None


def prefill_feeds(manifest: dict[str, Any], prompts: list[list[int]], slots: list[int], banks: dict[str, np.ndarray],
                  pad_id: int = 0, length: int | None = None, capacity: int | None = None) -> Batch:
    """The prefill graph's feeds for these prompts (one tenant slot each), padded to the
    longest prompt or to `length`; fused: KV buffers of `capacity` positions (default: the
    padded length)."""
    lens = np.array([len(p) for p in prompts], np.int64)
    pad = right_pad if is_fused(manifest) else left_pad  # as each flavour's runtime pads
    ids, mask = pad(prompts, pad_id, max(int(lens.max()), length or 0))
    slots_arr = np.asarray(slots, np.int64)
    if not is_fused(manifest):
        feeds = {mf.INPUT_IDS: ids, mf.ATTENTION_MASK: mask, mf.TENANT_SLOTS: slots_arr}
        feeds.update({n: banks[n] for n in mf.bank_names("prefill")})
        return Batch(prompts, slots_arr, feeds, lens)
    from milora.format import lora_batch

    base, t = manifest["base"], ids.shape[1]
    shape = (len(prompts), base["num_kv_heads"], max(capacity or 0, t), base["head_dim"])
    feeds = {mf.INPUT_IDS: ids, mf.SEQLENS_K: (lens - 1).astype(np.int32),
             mf.TOTAL_SEQUENCE_LENGTH: np.array(t, np.int32), mf.LOGITS_INDEX: (lens - 1)[:, None],
             mf.TENANT_SLOTS: slots_arr, mf.ROUTE: np.array(True)}
    for l in range(base["num_layers"]):
        for n in (mf.past_key(l), mf.past_value(l)):
            feeds[n] = np.zeros(shape, mf.NP_DTYPES[manifest["dtype"]])
    feeds.update({n: banks[n] for n in mf.bank_names("prefill") if n in banks})
    feeds.update(lora_batch.empty(base, manifest["dtype"]))
    return Batch(prompts, slots_arr, _wanted(manifest, feeds), lens)


def _wanted(manifest: dict[str, Any], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The feeds the graph takes (an export without tenants has no slot, route, bank or LoRA input)."""
    names = {i["name"] for i in manifest["graphs"]["decode"]["inputs"]}
    return {k: v for k, v in feeds.items() if k in names}


def run(sess, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
    names = outputs or [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    return dict(zip(names, sess.run(names, {k: v for k, v in feeds.items() if k in wanted})))


def last_logits(manifest: dict[str, Any], logits: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """[B, V] logits of each row's last prompt token from the prefill logits ([B, 1, V] or [B, T, V])."""
    if logits.shape[1] == 1:
        return logits[:, 0].astype(np.float32)
    if is_fused(manifest):
        return logits[np.arange(len(lens)), lens - 1].astype(np.float32)
    return logits[:, -1].astype(np.float32)


def decode_feeds(manifest: dict[str, Any], batch: Batch, prefill_out: dict[str, np.ndarray],
                 banks: dict[str, np.ndarray], steps: int, tokens, run_step) -> Iterator[dict[str, np.ndarray]]:
    """The decode graph's feeds for `steps` steps after this prefill; tokens(s) -> the [B] ids fed
    at step s (asked just before the step: it may depend on the previous step's logits).
    run_step(feeds) -> the step's outputs (present KV read back for the next step); yields each
    step's feeds before running it."""
    base, nl = manifest["base"], manifest["base"]["num_layers"]
    b = len(batch.prompts)
    gates = prefill_out[mf.GATES]
    if is_fused(manifest):
        from milora.format import lora_batch

        t = int(batch.lens.max())
        bufs = {}
        for l in range(nl):
            for n in (mf.present_key(l), mf.present_value(l)):
                have = prefill_out[n]
                bufs[n] = np.zeros((b, base["num_kv_heads"], max(t + steps, have.shape[2]), base["head_dim"]), have.dtype)
                bufs[n][:, :, :have.shape[2]] = have
        lora = lora_batch.build(banks, batch.slots, gates, base, manifest["max_rank"], manifest["dtype"])
        fixed = {**{n: banks[n] for n in mf.bank_names("prefill") if n in banks}, **lora,
                 mf.TENANT_SLOTS: batch.slots, mf.ROUTE: np.array(False), mf.LOGITS_INDEX: np.zeros((b, 1), np.int64)}
        for s in range(steps):
            cur = batch.lens + s
            feeds = {mf.INPUT_IDS: np.asarray(tokens(s), np.int64).reshape(b, 1), mf.SEQLENS_K: cur.astype(np.int32),
                     mf.TOTAL_SEQUENCE_LENGTH: np.array(cur.max() + 1, np.int32), **fixed}
            for l in range(nl):
                feeds[mf.past_key(l)] = bufs[mf.present_key(l)]
                feeds[mf.past_value(l)] = bufs[mf.present_value(l)]
            feeds = _wanted(manifest, feeds)
            yield feeds
            out = run_step(feeds)
            bufs = {n: out[n] for n in bufs}
        return
    mask = batch.feeds[mf.ATTENTION_MASK]
    past = prefill_out
    for s in range(steps):
        mask = np.concatenate([mask, np.ones((b, 1), np.int64)], axis=1)
        feeds = {mf.INPUT_IDS: np.asarray(tokens(s), np.int64).reshape(b, 1), mf.ATTENTION_MASK: mask,
                 mf.TENANT_SLOTS: batch.slots, mf.GATES: gates}
        feeds.update({n: banks[n] for n in mf.bank_names("decode")})
        for l in range(nl):
            feeds[mf.past_key(l)], feeds[mf.past_value(l)] = past[mf.present_key(l)], past[mf.present_value(l)]
        yield feeds
        past = run_step(feeds)
