"""`python -m services.registry --help`"""

import sys

from services.common.config import parse_config
from services.common.server import run
from services.registry.app import RegistryApp
from services.registry.config import RegistryConfig


def main(argv: list[str] | None = None) -> int:
    config = parse_config(RegistryConfig, argv, prog="python -m services.registry")
    return run(RegistryApp(config), config, "registry")


if __name__ == "__main__":
    sys.exit(main())
