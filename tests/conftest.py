import os

# One thread per process: the suite runs on 2 cores next to spawned ranks.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
