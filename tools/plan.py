"""Plan a layout: memory and time per GPU for a model x layout x cluster, and the fastest layouts that fit.

    python tools/plan.py xl-64 --gpus 8 64 256 --explain
    python tools/plan.py recipes/igpt_xl.yaml --own-layout --gpus 32

The same as `megapixel plan`; the formulas and what was checked are in docs/scaling.md.
"""

from __future__ import annotations

import sys

from megapixel.cli import main

if __name__ == "__main__":
    sys.exit(main(["plan", *sys.argv[1:]]))
