"""genflow side by side with eager PyTorch, torch.compile, the bandwidth floor and the peer
libraries: a thin wrapper of ``genflow bench`` (genflow/bench.py holds the cases).

    python bench/compare.py --quick                 # = genflow bench --quick
    python bench/compare.py --only ops --json out.json
"""
import sys

from genflow.bench import main

if __name__ == "__main__":
    sys.exit(main())
