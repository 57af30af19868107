"""The `loraplex` command: local stack and developer tools.

  loraplex up [--data-dir DIR] [--base-model PATH] [ports...]   start all four services
  loraplex demo [--once] [--attach ...]                         train, deploy and serve customers A, B, C
  loraplex health HOST:PORT                                     exit 0 when a service reports SERVING
  loraplex adapter upload PATH --name N --base-model B          upload a PEFT adapter (--deploy D: serve it)
  loraplex adapter list | deploy DEPLOYMENT ADAPTER             a tenant's adapters; point a deployment at one
  loraplex model tiny DIR [--preset tiny|small] [--arch ...]    build an offline test model
  loraplex proto                                                regenerate gRPC stubs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _model_command(argv: list[str]) -> int:
    from services.common.tiny_model import ARCHES, PRESETS, build_model_folder

    parser = argparse.ArgumentParser(prog="loraplex model tiny",
                                     description="Build a small Llama-family checkpoint offline (seeded).")
    parser.add_argument("directory", type=Path, help="output folder (created)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--arch", choices=sorted(ARCHES), default="llama")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tie-word-embeddings", action="store_true")
    args = parser.parse_args(argv)
    folder = build_model_folder(args.directory, preset=args.preset, arch=args.arch, seed=args.seed,
                                tie_word_embeddings=args.tie_word_embeddings)
    print(folder)
    return 0


def _up_command(argv: list[str]) -> int:
    from services.common.config import parse_config
    from services.common.stack import StackConfig, run_stack

    return run_stack(parse_config(StackConfig, argv, prog="loraplex up"))


def _demo_command(argv: list[str]) -> int:
    from services.common.config import parse_config
    from services.demo.config import DemoConfig
    from services.demo.run import run_demo

    return run_demo(parse_config(DemoConfig, argv, prog="loraplex demo"))


def main(argv: list[str] | None = None) -> int:
    try:
        return _dispatch(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        # Ctrl-C before a command installs its own handler (importing torch and transformers
        # takes seconds): a one-line exit, not a traceback from the middle of an import.
        print("interrupted", file=sys.stderr)
        return 130


def _dispatch(argv: list[str]) -> int:
    # The module docstring's command list is the epilog: `loraplex --help` showed only the bare
    # choices {up,demo,...}, leaving what each does to the README.
    lines = __doc__.strip().splitlines()
    parser = argparse.ArgumentParser(prog="loraplex", description=lines[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="commands:\n" + "\n".join(lines[1:]).strip("\n"))
    parser.add_argument("command", choices=["up", "demo", "health", "adapter", "model", "proto"], help="what to do")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "up":
        return _up_command(rest)
    if command == "demo":
        return _demo_command(rest)
    if command == "health":
        from services.common.healthcheck import main as health_main

        return health_main(rest, prog="loraplex health")
    if command == "adapter":
        from services.common.adapter_cli import main as adapter_main

        return adapter_main(rest)
    if command == "model":
        if not rest or rest[0] != "tiny":
            parser.error("usage: loraplex model tiny DIR [--preset tiny|small] [--arch llama|mistral|qwen2|qwen3]")
        return _model_command(rest[1:])
    if command == "proto":
        from services.common.protogen import main as protogen_main

        return protogen_main(rest)
    parser.error(f"unknown command {command!r}; choose from up, demo, health, adapter, model, proto")
    return 2


if __name__ == "__main__":
    sys.exit(main())
