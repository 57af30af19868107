"""`python -m services.trainer --help`"""

import sys

from services.common.config import parse_config
from services.common.server import run
from services.trainer.app import TrainerApp
from services.trainer.config import TrainerConfig


def main(argv: list[str] | None = None) -> int:
    config = parse_config(TrainerConfig, argv, prog="python -m services.trainer")
    return run(TrainerApp(config), config, "trainer")


if __name__ == "__main__":
    sys.exit(main())
