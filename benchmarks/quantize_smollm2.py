"""Quantized milora exports of SmolLM2-135M-Instruct with the 3 demo tenants, beside
onnxruntime-genai's int4 build of the same model (BENCHMARKS.md, "Quantized deployments").

    python benchmarks/quantize_smollm2.py [--work DIR] [--rounds 3] [--new 64] [--genai-python P]

One run does everything:
  1. prepare (cached in --work): the float32 export (default flavour: fused) of SmolLM2 with the
     demo tenants (arc-easy, boolq, gsm-symbolic; milora-assets demo-tenants) and 9 slots; a
     prompts file from each tenant's own task (dev split: half calibrates, half is the report's);
     milora-quantize at fp16, int8-dynamic, int8-weight, int4 with the agreement report and each tenant's
     task accuracy on its task's test split; genai's int4 build (its model builder, -p int4 -e cpu).
  2. measure: each (system, batch) in a fresh process: load, one warm-up generation, then one
     timed greedy generation of --new tokens; decode tok/s = B x (new - 1) / (last token time -
     first token time); peak RSS = the process's VmHWM. B=1: one tenant (arc-easy). B=8:
     8 different MiLoRA tenants (the 3 demo tenants and 5 more slots loaded with their packs
     under other names) for milora; the bare base model for genai (it serves no MiLoRA tenant).
     Systems are interleaved within each round; medians over rounds. `uptime` is recorded
     before and after each measurement (the machine is shared).
  3. write --json (all records) and print the markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = ("Explain in a few sentences why the sky is blue, and what changes at sunset when the light "
          "travels through more of the atmosphere.")
PRECISIONS = ("fp32", "fp16", "int8-dynamic", "int8-weight", "int4")
TASK_OF = {"arc-easy": "arc_e", "boolq": "boolq", "gsm-symbolic": "gsm_symbolic"}
GENAI_PYTHON = "/tmp/peers/genai/bin/python"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def uptime() -> str:
    try:
        return Path("/proc/loadavg").read_text().split(" ")[0]
    except OSError:
        return "?"


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---- prepare ----

def prompts_file(path: Path, per_tenant: int) -> Path:
    from milora.train.data import load_task

    if path.is_file():
        return path
    with open(path, "w") as f:
        for tenant, task in TASK_OF.items():
            for ex in load_task(task, "dev", limit=per_tenant):
                f.write(json.dumps({"prompt": ex.prompt, "tenant": tenant}) + "\n")
    return path


def prepare(work: Path, args) -> dict:
    from milora.assets import smollm2_dir
    from milora.calibration.quantize import QuantizeOptions, quantize
    from milora.errors import AgreementError
    from milora.train.demo import demo_tenants

    work.mkdir(parents=True, exist_ok=True)
    base = Path(smollm2_dir())
    tenants = demo_tenants(progress=False)
    dirs = {"fp32": work / "fp32"}
    if not (dirs["fp32"] / "manifest.json").is_file():
        from milora.export.exporter import export

        log("exporting SmolLM2 + 3 demo tenants (float32)")
        t0 = time.perf_counter()
        export(base, dirs["fp32"], adapters={n: tenants[n] for n in TASK_OF}, slots=9, force=True, progress=False,
               torch_threads=1)
        log(f"  exported in {time.perf_counter() - t0:.0f} s")
    calib = prompts_file(work / "prompts.jsonl", args.prompts_per_tenant)
    reports = {}
    for p in PRECISIONS[1:]:
        dirs[p] = work / p
        if not (dirs[p] / "manifest.json").is_file():
            log(f"milora-quantize --precision {p}")
            opts = QuantizeOptions(precision=p, calibration=str(calib), report_prompts=args.report_prompts,
                                   report_steps=4, eval_tasks=dict(TASK_OF), eval_samples=args.eval_samples,
                                   force=True, progress=False, force_agreement=True)
            t0 = time.perf_counter()
            try:
                quantize(dirs["fp32"], dirs[p], opts)
            except AgreementError as exc:  # (not raised: forced; kept for clarity)
                log(str(exc))
            log(f"  {p} in {time.perf_counter() - t0:.0f} s")
        m = json.loads((dirs[p] / "manifest.json").read_text())
        reports[p] = json.loads((dirs[p] / "quantization" / "agreement.json").read_text())
        reports[p]["seconds"] = m["quantization"].get("seconds")
    genai = work / "genai-int4"
    if not (genai / "genai_config.json").is_file():
        log("building genai int4")
        subprocess.run([args.genai_python, "-m", "onnxruntime_genai.models.builder", "-m", str(base), "-i", str(base),
                        "-o", str(genai), "-p", "int4", "-e", "cpu", "-c", str(work / "genai-cache")], check=True,
                       stdout=subprocess.DEVNULL)
        shutil.rmtree(work / "genai-cache", ignore_errors=True)
    return {"base": str(base), "dirs": {k: str(v) for k, v in dirs.items()}, "genai": str(genai), "reports": reports,
            "tenant_dirs": {n: str(tenants[n]) for n in TASK_OF}}


# ---- one measurement (fresh process) ----

def measure_milora(export: str, batch: int, new: int, tokenizer: str) -> dict:
    from tokenizers import Tokenizer

    from milora.runtime import Engine, SamplingParams

    ids = Tokenizer.from_file(tokenizer).encode(PROMPT, add_special_tokens=False).ids
    engine = Engine(export, max_batch=8, verify=False)
    names = list(TASK_OF)
    if batch > 1:
        m = engine.bundle.manifest
        for i in range(batch - len(names)):  # more tenants: the demo packs again, in other slots
            src = names[i % len(TASK_OF)]
            engine.add_tenant(f"{src}-{i + 2}", Path(export) / m["tenants"][src]["pack"])
            names.append(f"{src}-{i + 2}")
    tenants = names[:batch]
    for t in tenants:
        engine.pin(t)

    def run(n):
        params = SamplingParams(max_new_tokens=n, ignore_eos=True)
        reqs = [engine.submit(t, prompt_ids=ids, params=params) for t in tenants]
        engine.run_until_done()
        return reqs

    run(8)  # warm-up
    reqs = run(new)
    first = min(r.token_times[0] for r in reqs)
    last = max(r.token_times[-1] for r in reqs)
    return {"tok_s": batch * (new - 1) / (last - first), "tenants": tenants,
            "tokens0": reqs[0].output_ids[:16]}


def measure_genai(model_dir: str, batch: int, new: int, tokenizer: str) -> dict:
    import numpy as np
    import onnxruntime_genai as og
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(tokenizer).encode(PROMPT, add_special_tokens=False).ids
    model = og.Model(og.Config(model_dir))

    def run(n):
        params = og.GeneratorParams(model)
        total = len(ids) + n
        params.set_search_options(do_sample=False, max_length=total, min_length=total, batch_size=batch)
        gen = og.Generator(model, params)
        gen.append_tokens(np.array([ids] * batch, dtype=np.int32))
        times = []
        while not gen.is_done():
            gen.generate_next_token()
            times.append(time.perf_counter())
        return times, [int(x) for x in gen.get_sequence(0)[len(ids):]]

    run(8)
    times, tokens = run(new)
    return {"tok_s": batch * (len(times) - 1) / (times[-1] - times[0]), "tokens0": tokens[:16]}


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: reset by exec, unlike ru_maxrss, which Linux carries over
    from the parent that spawned the worker)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(spec: dict) -> None:
    before = uptime()
    if spec["kind"] == "genai":
        out = measure_genai(spec["path"], spec["batch"], spec["new"], spec["tokenizer"])
    else:
        out = measure_milora(spec["path"], spec["batch"], spec["new"], spec["tokenizer"])
    out["peak_rss_mb"] = peak_rss_mb()
    out["load_before"], out["load_after"] = before, uptime()
    print(json.dumps(out))


def run_worker(spec: dict, python: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([python, str(Path(__file__).resolve()), "--worker", json.dumps(spec)], capture_output=True,
                         text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"worker {spec['system']} B={spec['batch']} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---- report ----

def table(result: dict) -> str:
    recs = result["records"]

    def med(system, b, key="tok_s"):
        vals = [r[key] for r in recs if r["system"] == system and r["batch"] == b]
        return statistics.median(vals) if vals else None

    lines = ["| system | size on disk MB | decode tok/s B=1 | decode tok/s B=8 | peak RSS MB B=1 / B=8 | "
             "routing agreement (min over tenants) | next-token agreement (min) | mean KL (max) | task accuracy "
             "arc-easy / boolq / gsm-symbolic |",
             "|---|---|---|---|---|---|---|---|---|"]
    acc_src = None
    for system in [*PRECISIONS, "genai-int4"]:
        size = result["sizes"][system] / 1e6
        rep = result["prep"]["reports"].get(system)
        if rep:
            per = rep["tenants"]
            routing = min(v["routing_agreement"] for v in per.values() if v["routing_agreement"] is not None)
            token = min(v["next_token_agreement"] for v in per.values())
            kl = max(v["kl_mean"] for v in per.values())
            acc = " / ".join(f"{per[t]['task_accuracy']['quantized']['accuracy']:.2f}" for t in TASK_OF)
            acc_src = " / ".join(f"{per[t]['task_accuracy']['source']['accuracy']:.2f}" for t in TASK_OF)
            agree = (f"{routing:.3f}", f"{token:.3f}", f"{kl:.4f}", acc)
        elif system == "fp32":
            agree = ("1 (reference)", "1 (reference)", "0", "(below)")
        else:
            agree = ("n/a (no routers)", "-", "-", "-")
        b8 = "8 MiLoRA tenants" if system != "genai-int4" else "bare base"
        lines.append(f"| {'milora ' + system if system != 'genai-int4' else system} | {size:.0f} | "
                     f"{med(system, 1):.1f} | {med(system, 8):.1f} ({b8}) | "
                     f"{med(system, 1, 'peak_rss_mb'):.0f} / {med(system, 8, 'peak_rss_mb'):.0f} | "
                     + " | ".join(agree) + " |")
    if acc_src:
        lines[2 + 0] = lines[2].replace("(below)", acc_src)
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("MILORA_CACHE", Path.home() / ".cache/milora"))
                    / "bench-quantize")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prompts-per-tenant", type=int, default=32)
    ap.add_argument("--report-prompts", type=int, default=16)
    ap.add_argument("--eval-samples", type=int, default=20)
    ap.add_argument("--genai-python", default=GENAI_PYTHON)
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "quantize_smollm2.json")
    ap.add_argument("--prepare-only", action="store_true")
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    t0 = time.perf_counter()
    prep = prepare(args.work, args)
    if args.prepare_only:
        return 0
    tokenizer = str(Path(prep["dirs"]["fp32"]) / "tokenizer.json")
    systems = {p: ("milora", prep["dirs"][p]) for p in PRECISIONS} | {"genai-int4": ("genai", prep["genai"])}
    sizes = {s: du(Path(path)) for s, (_, path) in systems.items()}
    records = []
    for rnd in range(args.rounds):
        for b in (1, 8):
            for system, (kind, path) in systems.items():
                spec = {"system": system, "kind": kind, "path": path, "batch": b, "new": args.new,
                        "tokenizer": tokenizer}
                python = args.genai_python if kind == "genai" else sys.executable
                rec = run_worker(spec, python) | {"system": system, "batch": b, "round": rnd}
                records.append(rec)
                log(f"round {rnd} {system} B={b}: {rec['tok_s']:.1f} tok/s, {rec['peak_rss_mb']:.0f} MB, "
                    f"load {rec['load_before']} -> {rec['load_after']}")
    result = {"prep": prep, "sizes": sizes, "records": records, "rounds": args.rounds, "new": args.new,
              "cpu_count": os.cpu_count(), "seconds": round(time.perf_counter() - t0)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
