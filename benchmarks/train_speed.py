"""Training-speed benchmark; the same as `sdlora bench` (see sdlora/train/bench.py and benchmarks/RESULTS.md).

    python benchmarks/train_speed.py --model sd15 --plan sweep      # on a GPU: full-size SD1.5, 512 px
    python benchmarks/train_speed.py --model sdxl --plan reference  # SDXL, 1024 px
"""

import sys

from sdlora.train.bench import main

if __name__ == "__main__":
    sys.exit(main())
