"""``torch.compile`` per module, the step a ``parallelize_<model>`` takes between CP and FSDP2.

Each module is compiled in place as its own graph (layers of one shape share it); where compile
cannot run here (no C++ compiler, no Triton), training goes on eagerly after one line saying why.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["compile_available", "compile_modules"]


def compile_available(device_type: str = "cpu") -> str | None:
    """None when torch.compile works here, else the reason (no C++ compiler, no Triton...)."""
    try:
        probe = torch.compile(lambda x: x * 2 + 1, dynamic=False)
        probe(torch.ones(4, device=device_type))
    except Exception as err:  # any backend failure means: train eagerly
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


def compile_modules(modules: Iterable[nn.Module], device_type: str, verbose: bool = True) -> bool:
    """Compile every module in place (static shapes: the packing fixes them); returns False,
    after saying why when ``verbose``, where compile cannot run."""
    reason = compile_available(device_type)
    if reason is not None:
        if verbose:
            print(f"train.compile=true but torch.compile cannot run here ({reason}): "
                  "training eagerly", flush=True)  # fmt: skip
        return False
    for module in modules:
        module.compile(dynamic=False)
    return True
