"""milora-eval: accuracy of a base model, a LoRA or a MiLoRA adapter on a task split, with a
95% bootstrap interval; optionally the routing statistics (per-layer expert frequencies as
JSON and a PNG heat map). A thin layer over milora.train.api.

    milora-eval --base smollm2 --task arc_e                         the base model
    milora-eval --base smollm2 --adapter adapters/arc --task arc_e --routing-stats out/arc
    milora-eval --base ./my-llama --adapter a/ --data test.jsonl --json results.json

Multiple-choice items are scored by option log-likelihood (routing on the question's prompt
only); math items (an 'answer' and no choices) by greedy generation and answer extraction.
Exit status 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys

from milora.cli_errors import ArgumentParser, cli_main, positive
from milora.errors import MiloraError


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="milora-eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--base", required=True, help="base model directory (Hugging Face), or 'smollm2'")
    p.add_argument("--adapter", help="adapter directory (omit to evaluate the base model)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", help="built-in task: arc_e, arc_c, boolq, obqa, piqa, gsm8k, gsm_symbolic")
    src.add_argument("--data", help="JSONL file with choices+answer_index or answer per line")
    p.add_argument("--split", default="test", choices=("train", "dev", "test"), help="split of --task")
    p.add_argument("--limit", type=int, help="evaluate only the first N items")
    p.add_argument("--norm", default="char", choices=("char", "token", "none"),
                   help="option log-likelihood normalisation (multiple choice)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="generation budget (math)")
    p.add_argument("--no-chat", action="store_true", help="feed prompts raw, without the chat template")
    p.add_argument("--json", help="write the result (with per-item correctness) to this file")
    p.add_argument("--routing-stats", metavar="PREFIX", help="write PREFIX.json and PREFIX.png (routed adapters)")
    p.add_argument("--no-progress", action="store_true")
    return p


@cli_main("milora-eval")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    positive("--limit", args.limit)
    positive("--max-new-tokens", args.max_new_tokens)
    from milora.train.api import dataset, evaluate_adapter, load_for_eval, write_json

    report = evaluate_adapter(args.base, args.adapter, task=args.task, data=args.data, split=args.split,
                              limit=args.limit, chat=not args.no_chat, norm=args.norm,
                              max_new_tokens=args.max_new_tokens, progress=not args.no_progress)
    print(f"{report.task} [{report.split}] {args.adapter or 'base model'}: {report.result.summary()}")
    if args.json:
        write_json(report.to_dict(), args.json)
    if args.routing_stats:
        from milora.model.model import MiloraModel
        from milora.train.routing_stats import expert_frequencies, write_stats

        model, tok = load_for_eval(args.base, args.adapter)
        if not isinstance(model, MiloraModel) or model.routers is None:
            raise MiloraError("--routing-stats needs a routed (MiLoRA) adapter: give --adapter with a router")
        examples = dataset(args.task, args.data, args.split if args.task else "all", args.limit, dev_percent=0)
        freq = expert_frequencies(model, tok, examples, chat=not args.no_chat)
        js, png = write_stats(freq, len(examples), args.routing_stats, label=f"{report.task} {args.adapter}")
        print(f"routing statistics: {js}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
