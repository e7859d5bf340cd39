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
import json
import sys
import time
from pathlib import Path

from milora.errors import MiloraError
from milora.runtime.sampling import SamplingParams

SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "stop")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="milora-generate", description=__doc__.split("\n\n")[0],
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
    s.add_argument("--max-new-tokens", type=int, default=128)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--repetition-penalty", type=float, default=1.0)
    s.add_argument("--seed", type=int)
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    r = p.add_argument_group("runtime")
    r.add_argument("--providers", default="CPUExecutionProvider", help="comma-separated onnxruntime providers")
    r.add_argument("--threads", type=int, help="intra-op threads")
    r.add_argument("--max-batch", type=int, default=8)
    r.add_argument("--no-verify", action="store_true", help="skip the sha256 check of OUT_DIR's files")
    r.add_argument("--share-weights", action="store_true",
                   help="load the weights once for both graphs (~40%% less memory, slower decode on CPU)")
    return p


def _params(args, overrides: dict | None = None) -> SamplingParams:
    values = {f: getattr(args, f) for f in SAMPLING_FIELDS}
    values["stop"] = tuple(values["stop"])
    values.update(overrides or {})
    return SamplingParams(**values)


def _engine(args):
    from milora.runtime.engine import Engine

    return Engine(args.out_dir, providers=args.providers.split(","), max_batch=args.max_batch,
                  threads=args.threads, verify=not args.no_verify, share_weights=args.share_weights)


def _need_tenant(args) -> str:
    if not args.tenant:
        raise MiloraError("--tenant is required with --prompt and --chat (see --list-tenants)")
    return args.tenant


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


def read_batch(path: Path) -> list[dict]:
    if not path.is_file():
        raise MiloraError(f"batch file {path} does not exist")
    requests = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MiloraError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
        if not isinstance(item, dict) or "tenant" not in item or ("prompt" in item) == ("messages" in item):
            raise MiloraError(f"{path}:{n}: expected an object with 'tenant' and exactly one of 'prompt' or "
                              "'messages'")
        unknown = set(item) - {"tenant", "prompt", "messages", "id", *SAMPLING_FIELDS}
        if unknown:
            raise MiloraError(f"{path}:{n}: unknown keys {sorted(unknown)}")
        requests.append(item)
    if not requests:
        raise MiloraError(f"batch file {path} holds no requests")
    return requests


def run_batch(args) -> None:
    items = read_batch(args.batch)
    engine = _engine(args)
    t0 = time.perf_counter()
    reqs = []
    for item in items:
        overrides = {k: item[k] for k in SAMPLING_FIELDS if k in item}
        if "stop" in overrides:
            overrides["stop"] = tuple(overrides["stop"])
        kw = {"messages": item["messages"]} if "messages" in item else {"prompt": item["prompt"]}
        reqs.append(engine.submit(item["tenant"], params=_params(args, overrides), **kw))
    engine.run_until_done()
    out = open(args.output, "w") if args.output else sys.stdout
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.list_tenants:
            from milora.export.manifest import read_manifest

            for name, info in read_manifest(args.out_dir)["tenants"].items():
                print(f"{name}\tslot {info.get('slot')}")
        elif args.prompt is not None:
            run_prompt(args)
        elif args.chat:
            run_chat(args)
        else:
            run_batch(args)
    except MiloraError as exc:
        print(f"milora-generate: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
