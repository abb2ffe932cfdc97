"""Entry point of the `sdlora` console script and of `python -m sdlora.cli` (what `accelerate launch -m sdlora.cli`
and `torchrun -m sdlora.cli` start); the command itself is `sdlora.ui.cli`."""

import sys

from sdlora.ui.cli import main

if __name__ == "__main__":
    sys.exit(main())
