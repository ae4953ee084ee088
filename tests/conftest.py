import os
from pathlib import Path

# One thread per process: the suite runs on 2 cores next to spawned ranks.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Every process a test starts with MULTITOKEN_FAULT set gets the fault actions (its
# sitecustomize); this process gets them below (the in-process CLI tests set it by monkeypatch).
_SITE = str(Path(__file__).parent / "helpers" / "site")
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (_SITE, os.environ.get("PYTHONPATH", "")) if p
)

import torch  # noqa: E402

from multitoken.testing import faults  # noqa: E402

torch.set_num_threads(1)
faults.install()
