"""`python -m services.inference --help`"""

import sys

from services.common.config import parse_config
from services.common.server import run
from services.inference.app import InferenceApp
from services.inference.config import InferenceConfig


def main(argv: list[str] | None = None) -> int:
    config = parse_config(InferenceConfig, argv, prog="python -m services.inference")
    return run(InferenceApp(config), config, "inference")


if __name__ == "__main__":
    sys.exit(main())
