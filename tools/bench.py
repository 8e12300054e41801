"""Benchmark maxwhisper against its peers; the same as `maxwhisper bench` (see
maxwhisper/bench.py for the workloads), runnable from a source checkout:

    python tools/bench.py --model tiny.en --workload forced --batch 1 --tokens 128 --out bench.json --chart bench.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from maxwhisper import bench  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(parser)
    sys.exit(bench.main(parser.parse_args()))
