"""Small-scale replication of the MiLoRA paper's claim (not run in CI).

On SmolLM2-135M-Instruct and a few of the paper's commonsense tasks, compare
    base       the model as shipped
    lora       LoRA on all 7 modules (a non-routed adapter: fixed gates of 1), rank r
    milora_k1  MiLoRA, top-1 of 7 modules per layer, rank r
    milora_k2  MiLoRA, top-2, rank r
trained on the same data, steps and seeds. Reports test accuracy per seed, the differences
with paired bootstrap 95% intervals (pairs are (seed, question)), tunable parameters and
LoRA parameters activated per token (from the measured routing frequencies), and a routing
heat map per task. Results go to --out (results.json, results.md, routing_*.png/json);
each run is appended to results.json as soon as it finishes, so a stopped run keeps what
it had.

    python benchmarks/replicate_paper.py --tasks arc_e obqa piqa --seeds 0 1 --steps 20
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from milora.assets import smollm2_dir
from milora.format.contract import EXPERTS
from milora.format.config import MiloraConfig
from milora.model.model import MiloraModel
from milora.train.data import load_task
from milora.train.eval import evaluate_mc, paired_bootstrap
from milora.train.loop import TrainConfig, train
from milora.train.routing_stats import write_stats

METHODS = {
    "lora": dict(routed=False, top_k=7),
    "milora_k1": dict(top_k=1),
    "milora_k2": dict(top_k=2),
}


def load_base(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def lora_sizes(model: MiloraModel) -> dict[str, int]:
    """LoRA parameters of one layer's module, per expert name (same in every layer)."""
    return {m: model.linears[(0, m)].lora_A.numel() + model.linears[(0, m)].lora_B.numel()
            for m in model.config.target_modules}


def param_counts(model: MiloraModel, freq: torch.Tensor | None) -> dict[str, float]:
    """tunable: every adapter parameter. activated_per_token: LoRA parameters that touch a
    token (expected over prompts, from routing frequencies [L, 7]); routers run once per
    prompt, not per token, so they are reported apart."""
    sizes = lora_sizes(model)
    router = sum(p.numel() for r in (model.routers or []) for p in r.parameters())
    lora_total = sum(sizes.values()) * model.num_layers
    if freq is None:
        activated = float(lora_total)
    else:
        per_expert = torch.tensor([sizes.get(m, 0) for m in EXPERTS], dtype=torch.float64)
        activated = float((freq.double() * per_expert).sum())
    return {"tunable": lora_total + router, "router": router, "activated_per_token": activated}


def run(args) -> None:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base_dir = smollm2_dir()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() and args.resume else {"runs": []}
    done = {(r["task"], r["method"], r["seed"]) for r in results["runs"]}
    results["settings"] = vars(args)

    def record(entry):
        results["runs"].append(entry)
        results_file.write_text(json.dumps(results, indent=1) + "\n")
        print(f"[{time.strftime('%H:%M:%S')}] {entry['task']} {entry['method']} seed {entry['seed']}: "
              f"acc {100 * entry['accuracy']:.1f}% ({entry['seconds']:.0f}s)", flush=True)

    for task in args.tasks:
        train_data = load_task(task, "train", args.train_limit)
        test_data = load_task(task, "test", args.test_limit)
        if (task, "base", 0) not in done:
            t0 = time.time()
            res = evaluate_mc(load_base(base_dir), tok, test_data, chat=args.chat, max_length=args.max_length)
            record({"task": task, "method": "base", "seed": 0, "accuracy": res.accuracy, "correct": res.correct,
                    "seconds": time.time() - t0, "params": {"tunable": 0, "router": 0, "activated_per_token": 0}})
        for seed in args.seeds:
            for method, options in METHODS.items():
                if (task, method, seed) in done:
                    continue
                t0 = time.time()
                torch.manual_seed(seed)
                cfg = MiloraConfig(rank=args.rank, alpha=2.0 * args.rank, lb_coef=args.lb_coef, **options)
                model = MiloraModel(load_base(base_dir), cfg)
                tcfg = TrainConfig(lr=args.lr, max_steps=args.steps, batch_size=args.batch_size,
                                   eval_every=args.steps + 1, warmup_ratio=0.1, seed=seed, max_length=args.max_length,
                                   chat=args.chat)
                tr = train(model, tok, train_data, [], tcfg, Path(args.adapters) / f"{task}-{method}-s{seed}",
                           progress=args.progress)
                train_s = time.time() - t0
                counts = torch.zeros(model.num_layers, len(EXPERTS))
                res = evaluate_mc(model, tok, test_data, chat=args.chat, max_length=args.max_length,
                                  routing_counts=counts)
                freq = None
                if cfg.routed:
                    freq = counts / len(test_data)  # the routing of each test prompt, seen while scoring it
                    if seed == args.seeds[0]:
                        write_stats(freq, len(test_data), out / f"routing_{task}_{method}",
                                    label=f"SmolLM2-135M {task} {method} (test prompts)")
                record({"task": task, "method": method, "seed": seed, "accuracy": res.accuracy,
                        "correct": res.correct, "seconds": time.time() - t0, "train_seconds": train_s,
                        "final_train_loss": tr.train_losses[-1] if tr.train_losses else None,
                        "params": param_counts(model, freq),
                        "frequency": freq.tolist() if freq is not None else None})
                del model
    (out / "results.md").write_text(summarise(results) + "\n")
    print(summarise(results))


def summarise(results: dict) -> str:
    runs = results["runs"]
    tasks = list(dict.fromkeys(r["task"] for r in runs))
    methods = ["base", *METHODS]
    lines = ["| method | tunable | activated LoRA params / token | " + " | ".join(tasks) + " | avg |",
             "|---|---|---|" + "---|" * (len(tasks) + 1)]
    by = {(r["task"], r["method"], r["seed"]): r for r in runs}
    for m in methods:
        accs, params = [], None
        for t in tasks:
            rs = [r for r in runs if r["task"] == t and r["method"] == m]
            accs.append(sum(r["accuracy"] for r in rs) / len(rs) if rs else None)
            params = params or (rs[0]["params"] if rs else None)
        shown = [f"{100 * a:.1f}" if a is not None else "-" for a in accs]
        valid = [a for a in accs if a is not None]
        avg = f"{100 * sum(valid) / len(valid):.1f}" if valid else "-"
        p = params or {}
        lines.append(f"| {m} | {p.get('tunable', 0) / 1e6:.2f}M | {p.get('activated_per_token', 0) / 1e6:.2f}M | "
                     + " | ".join(shown) + f" | {avg} |")
    lines += ["", "Differences in accuracy (percentage points), paired bootstrap 95% CI over (seed, question):", "",
              "| task | comparison | diff | 95% CI |", "|---|---|---|---|"]
    seeds = sorted({r["seed"] for r in runs if r["method"] != "base"})
    for t in tasks:
        for a, b in [("milora_k1", "lora"), ("milora_k2", "lora"), ("milora_k1", "base"), ("milora_k2", "base"),
                     ("lora", "base")]:
            xa, xb = [], []
            for s in seeds:
                ra = by.get((t, a, s))
                rb = by.get((t, b, 0 if b == "base" else s))
                if ra and rb:
                    xa += ra["correct"]
                    xb += rb["correct"]
            if xa:
                d, lo, hi = paired_bootstrap(xa, xb)
                lines.append(f"| {t} | {a} - {b} | {100 * d:+.1f} | [{100 * lo:+.1f}, {100 * hi:+.1f}] |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=["arc_e", "arc_c", "obqa"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lb-coef", type=float, default=1e-2)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--test-limit", type=int, default=60)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chat", action="store_true",
                   help="wrap prompts in the chat template (about 25 more tokens per prompt; off to save CPU)")
    p.add_argument("--out", default="benchmarks/results/replicate_paper")
    p.add_argument("--adapters", default="/tmp/milora-replicate-adapters", help="where trained adapters go")
    p.add_argument("--resume", action="store_true", help="skip runs already in --out/results.json")
    p.add_argument("--progress", action="store_true")
    run(p.parse_args())


if __name__ == "__main__":
    main()
