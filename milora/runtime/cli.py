"""milora-generate: generate with an exported directory (thin layer over milora.runtime.Engine).

    milora-generate OUT_DIR --tenant NAME --prompt TEXT       stream one answer
    milora-generate OUT_DIR --tenant NAME --chat              interactive chat
    milora-generate OUT_DIR --batch requests.jsonl            many tenants in one batch
    milora-generate OUT_DIR --list-tenants

Bad input (unknown tenant, missing or tampered OUT_DIR, prompt longer than the context, a
malformed JSONL line) prints one message and exits with status 2.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import time
from pathlib import Path

from milora.cli_errors import ArgumentParser, cli_main, positive
from milora.format.jsonfile import read_jsonl
from milora.errors import MiloraError, UsageError
from milora.runtime.engine import Engine
from milora.runtime.sampling import SamplingParams

# Engine's keyword defaults, read from its signature so the CLI cannot drift from the API.
ENGINE_DEFAULTS = {n: p.default for n, p in inspect.signature(Engine.__init__).parameters.items()
                   if p.default is not inspect.Parameter.empty}

SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "stop")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="milora-generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path, help="directory written by milora-export")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", help="one prompt (raw text; add --chat-template to wrap it as a user turn)")
    mode.add_argument("--chat", action="store_true", help="interactive chat; each turn is routed and prefilled anew")
    mode.add_argument("--batch", type=Path, help="JSONL file, one request per line: "
                      '{"tenant": ..., "prompt": ... | "messages": [...], "max_new_tokens": ...}')
    mode.add_argument("--list-tenants", action="store_true", help="print the tenants and exit")
    p.add_argument("--tenant", help="tenant name (required with --prompt and --chat)")
    p.add_argument("--chat-template", action="store_true", help="apply the tokenizer's chat template to --prompt")
    p.add_argument("--output", type=Path, help="--batch: write results as JSONL here (default: stdout)")
    s = p.add_argument_group("sampling")
    d = SamplingParams()  # the defaults are the API's own, never retyped here
    s.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help=f"(default {d.max_new_tokens})")
    s.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy (the default)")
    s.add_argument("--top-k", type=int, default=d.top_k, help=f"0 = off (default {d.top_k})")
    s.add_argument("--top-p", type=float, default=d.top_p, help=f"1 = off (default {d.top_p})")
    s.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty,
                   help=f"1 = off (default {d.repetition_penalty})")
    s.add_argument("--seed", type=int)
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    r = p.add_argument_group("runtime")
    r.add_argument("--providers", default="CPUExecutionProvider", help="comma-separated onnxruntime providers")
    r.add_argument("--threads", type=int, help="intra-op threads")
    r.add_argument("--max-batch", type=int, default=ENGINE_DEFAULTS["max_batch"],
                   help=f"(default {ENGINE_DEFAULTS['max_batch']})")
    r.add_argument("--no-verify", action="store_true", help="skip the sha256 check of OUT_DIR's files")
    r.add_argument("--share-weights", action="store_true",
                   help="map the weights file once, unpacked (portable exports: ~40%% less memory; slower decode "
                        "on CPU)")
    r.add_argument("--no-huge-pages", action="store_true",
                   help="leave the packed weights in 4 KB pages (default on CPU/Linux: moved into 2 MB pages at load, "
                        "faster decode, ~1.4 s more to load SmolLM2-135M)")
    return p


def _params(args, overrides: dict | None = None) -> SamplingParams:
    values = {f: getattr(args, f) for f in SAMPLING_FIELDS}
    values["stop"] = tuple(values["stop"])
    values.update(overrides or {})
    return SamplingParams(**values)


def _engine(args):
    from milora.errors import ManifestError

    try:
        return Engine(args.out_dir, providers=args.providers.split(","), max_batch=args.max_batch,
                      threads=args.threads, verify=not args.no_verify, share_weights=args.share_weights,
                      huge_pages=not args.no_huge_pages)
    except MiloraError:
        raise
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for a graph it cannot load
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        hint = " (it was opened with --no-verify: run without it to check every file's sha256)" \
            if args.no_verify else ""
        raise ManifestError(f"onnxruntime cannot load the graphs in {args.out_dir} ({type(exc).__name__}: "
                            f"{str(exc)[:200]}){hint}; the export is corrupt. Fix: export again") from None


def _need_tenant(args) -> str:
    if not args.tenant:
        raise UsageError("--tenant is required with --prompt and --chat; expected --tenant NAME. Fix: pick a name "
                         "from milora-generate OUT_DIR --list-tenants")
    return args.tenant


def check_args(args) -> None:
    """Refuse contradictory or out-of-range options before anything is loaded."""
    positive("--max-new-tokens", args.max_new_tokens)
    positive("--max-batch", args.max_batch)
    positive("--threads", args.threads)
    mode = "--batch" if args.batch else "--chat" if args.chat else "--list-tenants" if args.list_tenants else "--prompt"
    if args.output is not None and not args.batch:
        raise UsageError(f"--output writes --batch results and does not apply to {mode}; expected it only with "
                         "--batch. Fix: drop --output (the answer streams to stdout)")
    if args.tenant is not None and (args.batch or args.list_tenants):
        raise UsageError(f"--tenant does not apply to {mode} (each --batch line names its own tenant); expected it "
                         "only with --prompt or --chat. Fix: drop --tenant")
    if args.output is not None and args.output.is_dir():
        raise UsageError(f"--output {args.output} is a directory; expected a file path for the results. Fix: e.g. "
                         f"--output {args.output / 'results.jsonl'}")
    if args.output is not None and not args.output.parent.is_dir():
        raise UsageError(f"--output {args.output}: its directory {args.output.parent} does not exist; expected a "
                         "file path in an existing directory. Fix: create the directory or choose another path")
    if args.chat_template and args.prompt is None:
        raise UsageError(f"--chat-template applies to --prompt only, not to {mode}. Fix: drop --chat-template")
    if args.prompt is not None or args.chat:
        _need_tenant(args)
    if not args.list_tenants:
        _params(args)  # SamplingError (exit 2) for --max-new-tokens 0, --top-p 2, ...


def run_prompt(args) -> None:
    engine = _engine(args)
    tenant = _need_tenant(args)
    kw = {"messages": [{"role": "user", "content": args.prompt}]} if args.chat_template else {"prompt": args.prompt}
    req = engine.submit(tenant, params=_params(args), **kw)
    for text in engine.stream(req):
        print(text, end="", flush=True)
    print()
    _report([req], time.perf_counter() - req.submitted_at)


def run_chat(args) -> None:
    engine = _engine(args)
    tenant = _need_tenant(args)
    messages: list[dict[str, str]] = []
    print(f"chat with tenant {tenant!r}; empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        req = engine.submit(tenant, messages=messages, params=_params(args))
        for text in engine.stream(req):
            print(text, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": req.text})


_FIELD_TYPES = {"max_new_tokens": (int,), "temperature": (int, float), "top_k": (int,), "top_p": (int, float),
                "repetition_penalty": (int, float), "seed": (int, type(None)), "stop": (list, str)}


def _check_item(item: object, where: str) -> dict:
    """One batch line as a request dict, or MiloraError naming the line and the field."""
    if not isinstance(item, dict) or "tenant" not in item or ("prompt" in item) == ("messages" in item):
        raise MiloraError(f"{where}: expected an object with 'tenant' and exactly one of 'prompt' or 'messages', "
                          f"got {json.dumps(item)[:80]}")
    unknown = set(item) - {"tenant", "prompt", "messages", "id", *SAMPLING_FIELDS}
    if unknown:
        raise MiloraError(f"{where}: unknown keys {sorted(unknown)}; expected tenant, prompt | messages, id and "
                          f"sampling fields ({', '.join(SAMPLING_FIELDS)})")
    if not isinstance(item["tenant"], str):
        raise MiloraError(f"{where}: 'tenant' is {item['tenant']!r}; expected a tenant name (a string)")
    if "prompt" in item and not isinstance(item["prompt"], str):
        raise MiloraError(f"{where}: 'prompt' is {type(item['prompt']).__name__}; expected a string")
    if "messages" in item:
        msgs = item["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs):
            raise MiloraError(f"{where}: 'messages' must be a non-empty list of {{\"role\": str, \"content\": str}} "
                              "objects")
    for name, types in _FIELD_TYPES.items():
        value = item.get(name)
        if name not in item or (isinstance(value, types) and not isinstance(value, bool)):
            if name == "stop" and isinstance(value, list) and not all(isinstance(x, str) for x in value):
                raise MiloraError(f"{where}: 'stop' must be a string or a list of strings, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise MiloraError(f"{where}: {name!r} is {value!r}; expected a finite number")
            continue
        raise MiloraError(f"{where}: {name!r} is {value!r}; expected {' or '.join(t.__name__ for t in types)}")
    try:
        SamplingParams(**_sampling_overrides(item))
    except MiloraError as exc:
        raise MiloraError(f"{where}: {exc}") from None
    return item


def _sampling_overrides(item: dict) -> dict:
    overrides = {k: item[k] for k in SAMPLING_FIELDS if k in item}
    if "stop" in overrides:
        stop = overrides["stop"]
        overrides["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
    return overrides


def read_batch(path: Path) -> list[dict]:
    """The requests of a --batch JSONL file; MiloraError naming FILE:LINE for a bad line."""
    requests = [_check_item(item, where) for where, item in read_jsonl(path, MiloraError, "one request object")]
    if not requests:
        raise MiloraError(f"batch file {path} holds no requests; expected one JSON object per line")
    return requests


def run_batch(args) -> None:
    items = read_batch(args.batch)
    engine = _engine(args)
    t0 = time.perf_counter()
    reqs = []
    for item in items:
        overrides = _sampling_overrides(item)
        kw = {"messages": item["messages"]} if "messages" in item else {"prompt": item["prompt"]}
        reqs.append(engine.submit(item["tenant"], params=_params(args, overrides), **kw))
    engine.run_until_done()
    try:
        out = open(args.output, "w") if args.output else sys.stdout
    except OSError as exc:
        raise MiloraError(f"cannot write results to --output {args.output}: {exc.strerror}; expected a writable "
                          "file path. Fix: choose a path in an existing, writable directory") from None
    try:
        for item, r in zip(items, reqs):
            out.write(json.dumps({"id": item.get("id"), "tenant": r.tenant, "text": r.text,
                                  "tokens": len(r.output_ids), "finish_reason": r.finish_reason}) + "\n")
    finally:
        if args.output:
            out.close()
    _report(reqs, time.perf_counter() - t0)


def _report(reqs, seconds: float) -> None:
    tokens = sum(len(r.output_ids) for r in reqs)
    ttft = [r.first_token_at - r.submitted_at for r in reqs if r.first_token_at]
    print(f"[{len(reqs)} request(s), {tokens} tokens in {seconds:.2f} s: {tokens / max(seconds, 1e-9):.1f} tok/s; "
          f"time to first token {1000 * min(ttft):.0f}-{1000 * max(ttft):.0f} ms]" if ttft else "", file=sys.stderr)


@cli_main("milora-generate")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    if args.list_tenants:
        from milora.format.manifest import read_manifest

        for name, info in read_manifest(args.out_dir)["tenants"].items():
            print(f"{name}\tslot {info.get('slot')}")
    elif args.prompt is not None:
        run_prompt(args)
    elif args.chat:
        run_chat(args)
    else:
        run_batch(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
