import sys

from lnarize_serve.cli import main

# vLLM starts its engine in a spawned process, which re-imports __main__:
# the guard keeps that import from starting a second server.
if __name__ == "__main__":
    sys.exit(main())
