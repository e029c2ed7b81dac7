"""Entry point for launchers: time mtnlg's training step for the config's (tp, pp, dp) layout at several
micro-batch counts. See mtnlg/bench/layouts.py.

    deepspeed --num_gpus 2 scripts/bench_layouts.py --config RUN.yaml --set parallel.pipeline=2
    torchrun --nproc_per_node 2 scripts/bench_layouts.py --config RUN.yaml --set parallel.tensor=2
"""

import os
import sys

if __name__ == "__main__":
    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.accelerator.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    from mtnlg.bench.layouts import main

    sys.exit(main())
