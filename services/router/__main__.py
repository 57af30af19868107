"""`python -m services.router --help`"""

import sys

from services.common.config import parse_config
from services.common.server import run
from services.router.app import RouterApp
from services.router.config import RouterConfig


def main(argv: list[str] | None = None) -> int:
    config = parse_config(RouterConfig, argv, prog="python -m services.router")
    return run(RouterApp(config), config, "router")


if __name__ == "__main__":
    sys.exit(main())
