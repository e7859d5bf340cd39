"""Polygraphy with milora::RoutedLora registered: `python -m milora.plugins.polygraphy_cli ARGS`
is `polygraphy ARGS` in a process where TensorRT can parse the exported graphs (where TensorRT
is installed). Needed where no data-loader script is imported (which registers the plugin as
well), e.g. the check command of `polygraphy debug reduce` run on saved inputs
(docs/tensorrt.md)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from milora.errors import DependencyError

    try:
        from milora.plugins.trt_plugin import register

        register()
    except DependencyError:
        pass  # no TensorRT here: runs that do not use --trt still work
    from polygraphy.tools import main as polygraphy_main

    sys.argv = ["polygraphy", *(sys.argv[1:] if argv is None else argv)]
    return polygraphy_main()


if __name__ == "__main__":
    sys.exit(main())
