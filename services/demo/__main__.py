"""`python -m services.demo` is `loraplex demo`."""

import sys

from services.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
