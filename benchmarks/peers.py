"""milora against its peers on SmolLM2-135M-Instruct, side by side in ONE run (not
run in CI). Writes a BENCHMARKS.md-ready table, benchmarks/results/peers.json and PNG charts.

    python benchmarks/peers.py [--quick] [--rounds 3] [--work-dir DIR] [--genai-venv V --genai-model M]
        [--optimum-venv V] [--from-json benchmarks/results/peers.json]

Systems (each at B=1 and B=8 unless noted; every one gets the same 128-token prompts, greedy,
128 new tokens with EOS ignored, 2 intra-op threads):
  milora-base           milora's fused export of the base model alone (no tenants, no LoRA op)
  milora-k1-r16         MiLoRA k=1 rank 16: B=1 one tenant, B=8 eight different tenants
  milora-k2-r16         MiLoRA k=2 rank 16
  milora-lora-r16       plain (dense, non-routed) LoRA on all 7 modules, rank 16, unmerged
  milora-k1-r32 / milora-lora-r32   the same at rank 32
  genai                 onnxruntime-genai fp32, built by its own model builder from the same HF
                        directory (own venv: it pins transformers 5)
  optimum               Optimum's ORTModelForCausalLM (its own export; own venv: optimum-onnx
                        pins transformers < 4.58 and optimum 2.1)
  torch-milora          PyTorch eager, the reference MiloraModel with one k=1 r16 adapter (at B=8
                        its rows share it: the reference holds one adapter per model)
  peft-1                PyTorch eager + PEFT, one r16 7-module LoRA adapter, unmerged
  peft-8mixed           PEFT with 8 such adapters, one per row (adapter_names; B=8 only)
Tenants and adapters are random with non-zero LoRA B (seeded; speed does not depend on training).

Method: every measurement is a fresh process (this file run as `worker`, by the system's own
venv's python) that loads the system, runs one warm-up generation of the same shape (16 new
tokens), then the timed one. Rounds interleave all systems in a fixed order, so load drift hits
them alike; figures are medians over rounds. TTFT = submit to first token (prefill and the first
sampling); decode tok/s = B x (new tokens - 1) / (last token time - first token time). Memory from
/proc/self: peak RSS (VmHWM) and, at the end of the run, PSS and USS (smaps_rollup). The load
average is recorded before every measurement. The floor: weight bytes read per decode step over a
measured memory read bandwidth (2 threads).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PROMPT_TOKENS = 128
NEW_TOKENS = 128
THREADS = 2
BATCHES = (1, 8)
WARMUP_TOKENS = 16
GENAI_PINS = ["torch==2.13.0", "onnxruntime-genai==0.18.0", "transformers==5.24.0", "onnx-ir", "onnx==1.23.2",
              "onnxruntime==1.32.0", "gguf", "safetensors", "sentencepiece"]
OPTIMUM_PINS = ["torch==2.13.0", "optimum-onnx[onnxruntime]==0.1.0", "transformers==4.57.6", "onnx==1.23.2",
                "onnxruntime==1.32.0"]
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------- measurement helpers (any venv)

def proc_memory() -> dict[str, float]:
    """MB: peak RSS (VmHWM), RSS now, and PSS / USS now where /proc/self/smaps_rollup is readable."""
    out: dict[str, float] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[{"VmHWM": "peak_rss_mb", "VmRSS": "rss_mb"}[key]] = int(rest.split()[0]) / 1024
    try:
        roll = {}
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[0].endswith(":") and parts[-1] == "kB":
                    roll[parts[0][:-1]] = int(parts[1])
        out["pss_mb"] = roll["Pss"] / 1024
        out["uss_mb"] = (roll["Private_Clean"] + roll["Private_Dirty"]) / 1024
        out["anon_mb"] = roll.get("Anonymous", 0) / 1024
        out["anon_huge_mb"] = roll.get("AnonHugePages", 0) / 1024
    except (OSError, KeyError):
        pass
    return out


def rates(token_times: list[list[float]], start: float) -> tuple[float, float]:
    """(decode tok/s, TTFT s) from per-row token timestamps (perf_counter) and the submit time."""
    first = min(t[0] for t in token_times)
    last = max(t[-1] for t in token_times)
    after_first = sum(len(t) - 1 for t in token_times)
    return after_first / (last - first), max(t[0] for t in token_times) - start


def loadavg() -> float:
    return os.getloadavg()[0]


# ---------------------------------------------------------------- workers (run in fresh processes)

def _hf_clock():
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        """HF generate calls put() once with the prompt, then once per generated step."""

        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    return Clock()


def _hf_generate(model, ids, new: int, **kwargs) -> tuple[list[list[float]], float, list[list[int]]]:
    import torch

    clock = _hf_clock()
    ids = torch.tensor(ids, dtype=torch.long)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, streamer=clock, pad_token_id=2, **kwargs)
    steps = clock.times[1:]  # one timestamp per generated step, for every row at once
    tokens = out[:, ids.shape[1]:].tolist()
    return [steps] * ids.shape[0], t0, tokens


def worker_milora(spec: dict, ids: list[list[int]], new: int):
    from milora.runtime import Engine, SamplingParams

    engine = Engine(spec["export"], max_batch=len(ids), threads=THREADS, verify=False,
                    share_weights=bool(spec.get("share_weights")), huge_pages=spec.get("huge_pages", True))
    tenants = spec["tenants"] or [None] * len(ids)
    for t in set(tenants) - {None}:
        engine.pin(t)

    def run(n):
        params = SamplingParams(max_new_tokens=n, ignore_eos=True)
        t0 = time.perf_counter()
        reqs = [engine.submit(t, prompt_ids=p, params=params) for t, p in zip(tenants, ids)]
        engine.run_until_done()
        return [r.token_times for r in reqs], t0, [r.output_ids for r in reqs]

    return run


def worker_genai(spec: dict, ids: list[list[int]], new: int):
    import numpy as np
    import onnxruntime_genai as og

    config = og.Config(spec["model"])
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": THREADS}}}}))
    model = og.Model(config)

    def run(n):
        t0 = time.perf_counter()
        params = og.GeneratorParams(model)
        total = len(ids[0]) + n
        params.set_search_options(do_sample=False, max_length=total, min_length=total, batch_size=len(ids))
        gen = og.Generator(model, params)
        gen.append_tokens(np.array(ids, dtype=np.int32))
        times: list[float] = []
        while not gen.is_done():
            gen.generate_next_token()
            times.append(time.perf_counter())
        tokens = [list(map(int, gen.get_sequence(b)[len(ids[b]):])) for b in range(len(ids))]
        return [times] * len(ids), t0, tokens

    return run


def worker_optimum(spec: dict, ids: list[list[int]], new: int):
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForCausalLM

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    model = ORTModelForCausalLM.from_pretrained(spec["model"], session_options=opts, use_cache=True)
    return lambda n: _hf_generate(model, ids, n)


def _torch_setup():
    import torch

    torch.set_num_threads(THREADS)


def worker_torch_milora(spec: dict, ids: list[list[int]], new: int):
    _torch_setup()
    from transformers import AutoModelForCausalLM

    from milora.model.model import MiloraModel

    model = MiloraModel.from_pretrained(AutoModelForCausalLM.from_pretrained(spec["base"]), spec["adapter"]).eval()
    return lambda n: _hf_generate(model, ids, n)


def worker_peft(spec: dict, ids: list[list[int]], new: int):
    _torch_setup()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapters = spec["adapters"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(spec["base"]), adapters[0],
                                      adapter_name="a0")
    for i, path in enumerate(adapters[1:], 1):
        model.load_adapter(path, adapter_name=f"a{i}")
    model.eval()
    names = [f"a{i % len(adapters)}" for i in range(len(ids))]
    kwargs = {"adapter_names": names} if len(adapters) > 1 else {}
    return lambda n: _hf_generate(model, ids, n, **kwargs)


WORKERS = {"milora": worker_milora, "genai": worker_genai, "optimum": worker_optimum,
           "torch-milora": worker_torch_milora, "peft": worker_peft}


def worker_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    ids = spec["prompts"][:spec["batch"]]
    t_load = time.perf_counter()
    run = WORKERS[spec["kind"]](spec, ids, spec["new_tokens"])
    load_s = time.perf_counter() - t_load
    run(WARMUP_TOKENS)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    times, t0, tokens = run(spec["new_tokens"])
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    tok_s, ttft = rates(times, t0)
    record = {"decode_tok_s": tok_s, "ttft_ms": 1000 * ttft, "load_s": load_s, **proc_memory(), "tokens": tokens,
              "new_tokens": [len(t) for t in tokens],
              "cpu_ms_per_token": 1000 * cpu_s / sum(len(t) for t in tokens)}
    print("RESULT " + json.dumps(record), flush=True)


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "worker":
    worker_main(sys.argv[2])
    sys.exit(0)


# ---------------------------------------------------------------- setup (milora's venv)

def log(msg: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_prompts(base_dir: Path, n: int = 8) -> list[list[int]]:
    """n real prompts of exactly PROMPT_TOKENS tokens: the first PROMPT_TOKENS tokens of the first
    BoolQ test items (passage + question) that are at least that long, raw text (no chat template)."""
    from transformers import AutoTokenizer

    from milora.train.data import load_task

    tok = AutoTokenizer.from_pretrained(base_dir)
    out = []
    for ex in load_task("boolq", "test", limit=200):
        ids = tok(ex.prompt, add_special_tokens=False).input_ids
        if len(ids) >= PROMPT_TOKENS:
            out.append(ids[:PROMPT_TOKENS])
        if len(out) == n:
            return out
    raise SystemExit("not enough long BoolQ prompts")


def make_milora_adapters(base_dir: Path, root: Path) -> dict[str, dict[str, Path]]:
    sys.path.insert(0, str(HERE))
    from runtime_smollm2 import make_adapters  # random, seeded, non-zero B

    return {"r16": make_adapters(base_dir, root, 16, {"milora-k1": {"top_k": 1}, "milora-k2": {"top_k": 2},
                                                       "lora-7": {"routed": False}}),
            "r32": make_adapters(base_dir, root, 32, {"milora-k1": {"top_k": 1}, "lora-7": {"routed": False}})}


def make_peft_adapters(base_dir: Path, root: Path, n: int = 8, rank: int = 16) -> list[Path]:
    """n PEFT LoRA adapters on all 7 modules, rank 16, random non-zero A and B (init_lora_weights=False)."""
    paths = [root / "peft" / f"lora-r{rank}-{i}" for i in range(n)]
    if all((p / "adapter_config.json").is_file() for p in paths):
        return paths
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    for i, path in enumerate(paths):
        torch.manual_seed(7000 + i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                               LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=MODULES, init_lora_weights=False))
        with torch.no_grad():  # PEFT's random init has B ~ N(0, 1): scale to a LoRA-sized update
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(1e-3)
        model.save_pretrained(path)
    return paths


def export_milora(base_dir: Path, out: Path, adapters: dict[str, Path]) -> Path:
    from milora.errors import ManifestError
    from milora.export.exporter import export
    from milora.format.manifest import read_manifest

    stamp = out.with_name(out.name + ".code")  # the exporter code that wrote it: a changed graph is exported again
    code = exporter_code_hash()
    if (out / "manifest.json").is_file():
        try:
            read_manifest(out)  # written by this milora's format (else: export again)
            if stamp.is_file() and stamp.read_text() == code:
                return out
            log(f"{out.name}: written by other exporter code; exporting again")
        except ManifestError as e:
            log(f"{out.name}: {e}; exporting again")

    t0 = time.perf_counter()
    export(base_dir, out, adapters={k: str(v) for k, v in adapters.items()}, validate=False, force=True,
           torch_threads=1, progress=False)
    stamp.write_text(code)
    log(f"exported {out.name} ({len(adapters)} tenants) in {time.perf_counter() - t0:.0f} s")
    return out


def exporter_code_hash() -> str:
    """sha256 over the sources that shape an export's graphs (milora/export, milora/format)."""
    h = hashlib.sha256()
    for path in sorted(p for d in ("export", "format") for p in (REPO / "milora" / d).rglob("*.py")):
        h.update(path.relative_to(REPO).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def venv(path: Path, pins: list[str], probe: str) -> Path:
    """A venv at path with pins installed (created once; reused when its python imports probe)."""
    python = path / "bin" / "python"
    if python.is_file() and subprocess.run([python, "-c", f"import {probe}"], capture_output=True).returncode == 0:
        return python
    log(f"creating venv {path} ({' '.join(pins)})")
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    # torch first, pinned: an unpinned resolve pulls a multi-GB CUDA build.
    subprocess.run([python, "-m", "pip", "install", "-q", pins[0]], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", *pins], check=True)
    return python


def genai_build(python: Path, base_dir: Path, out: Path, cache: Path) -> Path:
    if (out / "genai_config.json").is_file():
        return out
    log(f"building the genai fp32 model into {out}")
    subprocess.run([python, "-m", "onnxruntime_genai.models.builder", "-m", str(base_dir), "-i", str(base_dir),
                    "-o", str(out), "-p", "fp32", "-e", "cpu", "-c", str(cache)], check=True)
    return out


def optimum_build(python: Path, base_dir: Path, out: Path) -> Path:
    if (out / "config.json").is_file() and any(out.glob("*.onnx")):
        return out
    log(f"exporting with Optimum into {out}")
    code = ("import sys; from optimum.onnxruntime import ORTModelForCausalLM as M; "
            "m = M.from_pretrained(sys.argv[1], export=True, use_cache=True); m.save_pretrained(sys.argv[2])")
    subprocess.run([python, "-c", code, str(base_dir), str(out)], check=True)
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (base_dir / name).is_file():
            shutil.copy(base_dir / name, out / name)
    return out


def memory_bandwidth_gbs(mb: int = 512, threads: int = THREADS, repeats: int = 5) -> float:
    """Read bandwidth, GB/s: `threads` threads each summing its half of an mb-MB float32 array
    (numpy releases the GIL); best of `repeats`."""
    import threading

    import numpy as np

    a = np.ones(mb * 2 ** 20 // 4, np.float32)
    parts = np.array_split(a, threads)
    best = 0.0
    for _ in range(repeats):
        workers = [threading.Thread(target=np.add.reduce, args=(p,)) for p in parts]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, a.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def weight_bytes_per_step(base_dir: Path) -> int:
    """Bytes of base weights a decode step reads: every parameter once (tied embeddings counted
    once, as the LM head; the embedding lookup itself reads only B rows)."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(base_dir / "model.safetensors"), "np") as f:
        for name in f.keys():
            t = f.get_slice(name)
            n = 1
            for s in t.get_shape():
                n *= s
            total += n * 4  # fp32 at run time whatever the file holds
    return total


def systems(args, paths: dict) -> list[dict]:
    """Every (system, batch) measured, in the round's order."""
    out = []
    tenants = lambda exp, kind, rank: {"export": str(paths[exp]), "tenants": [f"{kind}-r{rank}-{i}" for i in range(8)]}
    milora = [("milora-base", {"export": str(paths["base"]), "tenants": None})]
    if not args.quick:
        milora += [("milora-k1-r16", tenants("r16", "milora-k1", 16)), ("milora-k2-r16", tenants("r16", "milora-k2", 16)),
                   ("milora-lora-r16", tenants("r16", "lora-7", 16)), ("milora-k1-r32", tenants("r32", "milora-k1", 32)),
                   ("milora-lora-r32", tenants("r32", "lora-7", 32))]
    else:
        milora += [("milora-k1-r16", tenants("r16", "milora-k1", 16))]
    # The weights option (share_weights: one mapped copy, prepacking off) beside the default.
    shared = ("milora-base-shared", {"export": str(paths["base"]), "tenants": None, "share_weights": True})
    # Huge pages (milora.runtime.hugepages, on by default on CPU) off, to show what they give.
    small_pages = [("milora-base-4k", {"export": str(paths["base"]), "tenants": None, "huge_pages": False}),
                   ("milora-k1-r16-4k", dict(tenants("r16", "milora-k1", 16), huge_pages=False))]
    milora_variants = {b: [shared, *small_pages] for b in BATCHES}
    for b in BATCHES:
        for name, spec in milora + milora_variants[b]:
            spec = dict(spec, tenants=spec["tenants"][:b] if spec["tenants"] else None)
            out.append({"system": name, "kind": "milora", "batch": b, "python": sys.executable, **spec})
        out.append({"system": "genai", "kind": "genai", "batch": b, "python": str(paths["genai_python"]),
                    "model": str(paths["genai_model"])})
        # genai with 2 MB pages too: glibc's malloc asks for them when told so at process start
        # (onnxruntime-genai has no setting of its own); the fair peer of our default.
        out.append({"system": "genai-thp", "kind": "genai", "batch": b, "python": str(paths["genai_python"]),
                    "model": str(paths["genai_model"]), "env": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}})
        if paths.get("optimum_python"):
            out.append({"system": "optimum", "kind": "optimum", "batch": b, "python": str(paths["optimum_python"]),
                        "model": str(paths["optimum_model"])})
        if not args.skip_torch:
            out.append({"system": "torch-milora", "kind": "torch-milora", "batch": b, "python": sys.executable,
                        "base": str(paths["base_dir"]), "adapter": str(paths["torch_adapter"])})
            out.append({"system": "peft-1", "kind": "peft", "batch": b, "python": sys.executable,
                        "base": str(paths["base_dir"]), "adapters": [str(paths["peft"][0])]})
            if b > 1:
                out.append({"system": "peft-8mixed", "kind": "peft", "batch": b, "python": sys.executable,
                            "base": str(paths["base_dir"]), "adapters": [str(p) for p in paths["peft"]]})
    return out


def measure(spec: dict, prompts: list[list[int]], new_tokens: int, timeout: int = 600) -> dict:
    """One fresh-process measurement: the worker's RESULT record, or {"error": ...}."""
    payload = dict(spec, prompts=prompts, new_tokens=new_tokens)
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), TOKENIZERS_PARALLELISM="false", **spec.get("env", {}))
    if spec["kind"] in ("torch-milora", "peft"):
        # OpenMP's spinning waits made PyTorch 5-20x slower whenever other jobs shared the
        # cores (5 tok/s at B=8 at load 2.5); passive waits are its best setting on a shared box.
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    if spec["python"] == sys.executable:
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    else:  # a peer's venv: nothing of ours on its path
        env.pop("PYTHONPATH", None)
    load = loadavg()
    try:
        proc = subprocess.run([spec["python"], str(Path(__file__).resolve()), "worker", json.dumps(payload)],
                              capture_output=True, text=True, env=env, timeout=timeout, cwd=str(HERE))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s", "load": load}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[7:]), load=load)
    return {"error": (proc.stderr or proc.stdout)[-2000:], "load": load}


def versions(paths: dict) -> dict:
    def ask(python, code):
        r = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
        return r.stdout.strip() or r.stderr.strip()[-200:]

    import onnxruntime
    import torch
    import transformers

    out = {"python": platform.python_version(), "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
           "transformers": transformers.__version__}
    try:
        import peft

        out["peft"] = peft.__version__
    except ImportError:
        pass
    out["genai"] = ask(paths["genai_python"], "import onnxruntime_genai as g, onnxruntime as o, transformers as t; "
                                              "print(f'onnxruntime-genai {g.__version__}, onnxruntime {o.__version__}, "
                                              "transformers {t.__version__}')")
    if paths.get("optimum_python"):
        out["optimum"] = ask(paths["optimum_python"],
                             "import importlib.metadata as m; print(', '.join(f'{p} {m.version(p)}' for p in "
                             "('optimum-onnx', 'optimum', 'onnxruntime', 'transformers')))")
    return out


def machine() -> dict:
    cpu = ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = 0
    try:
        mem = int(next(l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal"))) // 1024
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_mb": mem, "kernel": platform.release(),
            "date": time.strftime("%Y-%m-%d %H:%M")}


def summarise(samples: dict[tuple[str, int], list[dict]]) -> list[dict]:
    records = []
    for (system, batch), runs in samples.items():
        ok = [r for r in runs if "error" not in r]
        rec = {"system": system, "batch": batch, "runs": len(ok), "errors": len(runs) - len(ok)}
        if ok:
            for key in ("decode_tok_s", "ttft_ms", "peak_rss_mb", "pss_mb", "uss_mb", "load_s", "cpu_ms_per_token"):
                vals = [r[key] for r in ok if key in r]
                if vals:
                    rec[key] = round(statistics.median(vals), 2)
            rec["decode_tok_s_all"] = [round(r["decode_tok_s"], 2) for r in ok]
            rec["load_before"] = [round(r["load"], 2) for r in runs]
        else:
            rec["error"] = runs[-1]["error"][-500:] if runs else "not run"
        records.append(rec)
    return records


def token_check(first: dict[tuple[str, int], dict]) -> list[str]:
    """milora base vs genai greedy tokens on the benchmark prompts (each batch size)."""
    lines = []
    for b in BATCHES:
        ours, theirs = first.get(("milora-base", b)), first.get(("genai", b))
        if not ours or not theirs:
            lines.append(f"B={b}: not compared (a run failed)")
            continue
        rows = []
        for i, (a, g) in enumerate(zip(ours["tokens"], theirs["tokens"])):
            diff = next((j for j, (x, y) in enumerate(zip(a, g)) if x != y), None)
            if diff is None and len(a) != len(g):
                diff = min(len(a), len(g))
            rows.append(diff)
        same = sum(d is None for d in rows)
        where = ", ".join(f"prompt {i}: token {d}" for i, d in enumerate(rows) if d is not None)
        lines.append(f"B={b}: {same}/{len(rows)} prompts identical over {len(ours['tokens'][0])} tokens"
                     + (f"; first difference at {where}" if where else ""))
    return lines


def ratio(records: list[dict], system: str, other: str, batch: int, key: str = "decode_tok_s") -> float | None:
    a = next((r.get(key) for r in records if r["system"] == system and r["batch"] == batch), None)
    b = next((r.get(key) for r in records if r["system"] == other and r["batch"] == batch), None)
    return a / b if a and b else None


def report(result: dict) -> str:
    records = result["records"]
    fl = result["floor"]
    lines = ["| system | B | decode tok/s | vs genai | vs milora base | TTFT ms | peak RSS MB | PSS MB | USS MB "
             "| CPU ms/token | runs |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["batch"], records.index(r))):
        if "decode_tok_s" not in r:
            lines.append(f"| {r['system']} | {r['batch']} | failed: {r.get('error', '')[:80]!r} | | | | | | | | 0 |")
            continue
        vg = ratio(records, r["system"], "genai", r["batch"])
        vb = ratio(records, r["system"], "milora-base", r["batch"])
        f = lambda v, fmt: (fmt % v) if v is not None else "-"
        lines.append(f"| {r['system']} | {r['batch']} | {r['decode_tok_s']:.1f} | {f(vg, '%.2fx')} | {f(vb, '%.2fx')} | "
                     f"{r['ttft_ms']:.0f} | {r['peak_rss_mb']:.0f} | {f(r.get('pss_mb'), '%.0f')} | "
                     f"{f(r.get('uss_mb'), '%.0f')} | {f(r.get('cpu_ms_per_token'), '%.1f')} | {r['runs']} |")
    lines += ["", f"Floor: {fl['weight_mb']:.0f} MB of weights per decode step / {fl['bandwidth_gbs']:.1f} GB/s "
                  f"measured read bandwidth = {fl['step_ms']:.1f} ms per step: at most "
                  f"{fl['tok_s_b1']:.1f} tok/s at B=1, {fl['tok_s_b8']:.1f} at B=8 (weights only; KV reads add to it)."]
    lines += ["", "Greedy tokens, milora base vs genai: " + "; ".join(result["token_check"])]
    lines += ["", "Targets:"]
    for check in targets(records):
        lines.append(f"- {check}")
    gains = huge_page_gains(records)
    if gains:
        lines += ["", "2 MB pages (decode tok/s with / without, same round's runs):"] + [f"- {g}" for g in gains]
    return "\n".join(lines)


def per_round(records: list[dict], system: str, other: str, b: int) -> list[float] | None:
    """Decode ratios of the same round's runs (adjacent in time, so under similar load)."""
    a = next((r.get("decode_tok_s_all") for r in records if r["system"] == system and r["batch"] == b), None)
    c = next((r.get("decode_tok_s_all") for r in records if r["system"] == other and r["batch"] == b), None)
    return [x / y for x, y in zip(a, c)] if a and c and len(a) == len(c) else None


def huge_page_gains(records: list[dict]) -> list[str]:
    """What 2 MB pages give each system measured both ways (ours: the engine's default against
    huge_pages=False; genai: glibc's hugetlb tunable against none)."""
    out = []
    for with_, without in (("milora-base", "milora-base-4k"), ("milora-k1-r16", "milora-k1-r16-4k"), ("genai-thp", "genai")):
        for b in BATCHES:
            r = ratio(records, with_, without, b)
            if r is None:
                continue
            paired = per_round(records, with_, without, b)
            rounds = f" (per round {', '.join(f'{x:.2f}' for x in paired)})" if paired else ""
            out.append(f"{with_} / {without}, B={b}: {r:.2f}x{rounds}")
    return out


def targets(records: list[dict]) -> list[str]:
    out = []

    def line(what, value, goal, paired=None):
        if value is None:
            return f"{what}: not measured"
        rounds = f"; per round {', '.join(f'{x:.2f}' for x in paired)}" if paired else ""
        return f"{what}: {value:.2f}x (target {goal}){rounds} - {'met' if value >= goal - 1e-9 else 'NOT met'}"

    for b in BATCHES:
        out.append(line(f"milora base / genai decode, B={b}", ratio(records, "milora-base", "genai", b), 1.0,
                        per_round(records, "milora-base", "genai", b)))
    for b in BATCHES:
        out.append(line(f"milora base / genai with 2 MB pages (genai-thp) decode, B={b}",
                        ratio(records, "milora-base", "genai-thp", b), 1.0,
                        per_round(records, "milora-base", "genai-thp", b)))
    for b in BATCHES:
        r = ratio(records, "genai", "milora-base", b, "ttft_ms")
        out.append(line(f"genai TTFT / milora base TTFT, B={b} (>= 1 means ours is no slower)", r, 1.0))
    out.append(line("8 MiLoRA k=1 r16 tenants / milora base, B=8", ratio(records, "milora-k1-r16", "milora-base", 8), 0.90,
                    per_round(records, "milora-k1-r16", "milora-base", 8)))
    out.append(line("8 MiLoRA k=1 r16 tenants / genai base, B=8", ratio(records, "milora-k1-r16", "genai", 8), 1.0,
                    per_round(records, "milora-k1-r16", "genai", 8)))
    for b in BATCHES:
        r = ratio(records, "genai", "milora-base", b, "peak_rss_mb")
        out.append(line(f"genai peak RSS / milora base peak RSS, B={b} (>= 1 means ours is no larger)", r, 1.0))
    return out


def charts(result: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in result["records"] if "decode_tok_s" in r]
    paths = []
    for key, label, name in (("decode_tok_s", "decode tokens/s (higher is better)", "peers_decode.png"),
                             ("ttft_ms", "time to first token, ms (lower is better)", "peers_ttft.png"),
                             ("peak_rss_mb", "peak RSS, MB (lower is better)", "peers_memory.png")):
        fig, axes = plt.subplots(1, len(BATCHES), figsize=(12, 4.5))
        for ax, b in zip(axes, BATCHES):
            rows = [r for r in records if r["batch"] == b]
            colors = ["tab:blue" if r["system"].startswith("milora") else "tab:orange" if r["system"] == "genai"
                      else "tab:gray" for r in rows]
            ax.barh([r["system"] for r in rows], [r[key] for r in rows], color=colors)
            ax.invert_yaxis()
            ax.set_title(f"B={b}")
            ax.set_xlabel(label)
            if key == "decode_tok_s":
                fl = result["floor"]["tok_s_b1" if b == 1 else "tok_s_b8"]
                ax.axvline(fl, color="k", ls="--", lw=1)
                ax.text(fl, len(rows) - 0.5, " floor", va="bottom", fontsize=8)
        fig.suptitle(f"SmolLM2-135M fp32, {PROMPT_TOKENS}-token prompts, {result['settings']['new_tokens']} new tokens, "
                     f"{THREADS} threads ({result['machine']['date']})")
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="fresh-process measurements per system and batch")
    p.add_argument("--torch-rounds", type=int, default=2,
                   help="rounds for the PyTorch systems (the slowest by far; they run in the first rounds)")
    p.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    p.add_argument("--quick", action="store_true",
                   help="milora base + k=1 r16, genai, 2 rounds, 32 tokens, no Optimum or PyTorch (a smoke run)")
    p.add_argument("--work-dir", type=Path, help="venvs, peer builds, exports (default $MILORA_CACHE/bench-peers)")
    p.add_argument("--genai-venv", type=Path, help="an existing venv with onnxruntime-genai (else created)")
    p.add_argument("--genai-model", type=Path, help="an existing genai fp32 build of the same model (else built)")
    p.add_argument("--optimum-venv", type=Path, help="an existing venv with optimum-onnx (else created)")
    p.add_argument("--skip-optimum", action="store_true")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--json", type=Path, default=HERE / "results" / "peers.json")
    p.add_argument("--charts", type=Path, default=HERE / "results")
    p.add_argument("--from-json", type=Path, help="print the report of an earlier run and exit")
    p.add_argument("--only", nargs="+", metavar="SYSTEM",
                   help="measure only these systems (e.g. milora-base milora-k1-r16 genai: a repeat of the ratios "
                        "the targets name, with more rounds)")
    args = p.parse_args()
    if args.from_json:
        print(report(json.loads(args.from_json.read_text())))
        return
    if args.quick:
        args.rounds, args.new_tokens, args.skip_optimum, args.skip_torch = min(args.rounds, 2), 32, True, True

    from milora.assets import cache_root, smollm2_dir

    t_start = time.perf_counter()
    base_dir = smollm2_dir()
    work = args.work_dir or cache_root() / "bench-peers"
    work.mkdir(parents=True, exist_ok=True)
    paths: dict = {"base_dir": base_dir}
    paths["genai_python"] = venv(args.genai_venv or work / "venv-genai", GENAI_PINS, "onnxruntime_genai")
    paths["genai_model"] = args.genai_model or genai_build(paths["genai_python"], base_dir, work / "genai-fp32",
                                                           work / "genai-cache")
    if not args.skip_optimum:
        paths["optimum_python"] = venv(args.optimum_venv or work / "venv-optimum", OPTIMUM_PINS,
                                       "optimum.onnxruntime")
        paths["optimum_model"] = optimum_build(paths["optimum_python"], base_dir, work / "optimum-fp32")
    paths["base"] = export_milora(base_dir, work / "out-base", {})
    adapters = make_milora_adapters(base_dir, work)
    paths["r16"] = export_milora(base_dir, work / "out-r16", adapters["r16"])
    paths["r32"] = export_milora(base_dir, work / "out-r32", adapters["r32"])
    paths["torch_adapter"] = adapters["r16"]["milora-k1-r16-0"]
    if not args.skip_torch:
        paths["peft"] = make_peft_adapters(base_dir, work)
    prompts = make_prompts(base_dir)
    bw = memory_bandwidth_gbs()
    wbytes = weight_bytes_per_step(base_dir)
    step_s = wbytes / (bw * 1e9)
    floor = {"weight_mb": wbytes / 1e6, "bandwidth_gbs": bw, "step_ms": 1000 * step_s, "tok_s_b1": 1 / step_s,
             "tok_s_b8": 8 / step_s}
    log(f"setup done in {time.perf_counter() - t_start:.0f} s; floor {floor}")

    specs = systems(args, paths)
    if args.only:
        unknown = set(args.only) - {s["system"] for s in specs}
        if unknown:
            raise SystemExit(f"--only {' '.join(sorted(unknown))}: no such system; expected some of "
                             f"{', '.join(dict.fromkeys(s['system'] for s in specs))}")
        specs = [s for s in specs if s["system"] in args.only]
    samples: dict[tuple[str, int], list[dict]] = {(s["system"], s["batch"]): [] for s in specs}
    first: dict[tuple[str, int], dict] = {}
    for rnd in range(args.rounds):  # interleaved: every system once per round, same order
        for spec in specs:
            if spec["kind"] in ("torch-milora", "peft") and rnd >= args.torch_rounds:
                continue
            res = measure(spec, prompts, args.new_tokens)
            key = (spec["system"], spec["batch"])
            if "error" not in res and key not in first:
                first[key] = res
            samples[key].append({k: v for k, v in res.items() if k != "tokens"})
            log(f"round {rnd + 1}/{args.rounds} {key[0]} B={key[1]}: " +
                (f"{res['decode_tok_s']:.1f} tok/s, TTFT {res['ttft_ms']:.0f} ms, peak RSS {res['peak_rss_mb']:.0f} MB,"
                 f" load {res['load']:.2f}" if "error" not in res else f"FAILED {res['error'][-300:]}"))
        partial = {"partial_after_round": rnd + 1, "records": summarise(samples), "token_check": token_check(first)}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.with_suffix(".partial.json").write_text(json.dumps(partial, indent=1))
    records = summarise(samples)
    result = {"machine": machine(), "versions": versions(paths),
              "settings": {"prompt_tokens": PROMPT_TOKENS, "new_tokens": args.new_tokens, "threads": THREADS,
                           "rounds": args.rounds, "warmup_tokens": WARMUP_TOKENS, "quick": args.quick,
                           "prompts": "first 128 tokens of the first 8 BoolQ test items of >= 128 tokens, raw text",
                           "tenants": "random seeded adapters, non-zero LoRA B (benchmarks/runtime_smollm2.py "
                                      "make_adapters; PEFT: init_lora_weights=False, B scaled by 1e-3)",
                           "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])},
              "floor": floor, "records": records, "token_check": token_check(first),
              "wall_s": round(time.perf_counter() - t_start)}
    for rec in records:  # each record stands alone
        rec["machine"], rec["versions"] = result["machine"], result["versions"]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    args.json.with_suffix(".partial.json").unlink(missing_ok=True)
    args.charts.mkdir(parents=True, exist_ok=True)
    charts(result, args.charts)
    print(report(result))


if __name__ == "__main__":
    main()
