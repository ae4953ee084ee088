"""The ``[features]`` section: offline backbone features for heads-only runs."""

from __future__ import annotations

from dataclasses import dataclass

from multitoken.errors import ConfigError, require

__all__ = ["FeaturesSection", "FEATURE_MODES"]

FEATURE_MODES = ("online", "offline")
_DTYPES = ("float16", "bfloat16", "float32")


@dataclass
class FeaturesSection:
    """Offline backbone features for heads-only runs (mtp.freeze_base).

    Attributes:
        mode: "online" (the frozen decoder runs every step) or "offline" (its outputs, h^0 and
            the main head's per-token NLL and argmax, are read from a feature store built once
            beside the token store, by `multitoken features` or on the first run; each step
            runs only the MTP depths and the head).
        dtype: h^0 on disk: "float16" (11-bit mantissa; h^0 comes after the final norm, far
            below float16's 65504, and an overflow is refused), "bfloat16" (8-bit mantissa)
            or "float32" (the online losses exactly; twice the disk).
        path: the feature folder; "" = <data.cache_dir>/features-<key> (key: the token
            store, the backbone's weights, dtype, data.seq_len).
        batch_rows: rows of data.seq_len tokens per backbone call while building; 0 =
            data.batch_size.
    """

    mode: str = "online"
    dtype: str = "float16"
    path: str = ""
    batch_rows: int = 0

    def __post_init__(self) -> None:
        require(
            [
                (self.mode in FEATURE_MODES, "mode", 'must be "online" or "offline"'),
                (self.dtype in _DTYPES, "dtype", 'must be "float16", "bfloat16" or "float32"'),
                (self.batch_rows >= 0, "batch_rows", "must be >= 0 (0 = data.batch_size)"),
            ],
            self,
        )

    @property
    def offline(self) -> bool:
        return self.mode == "offline"

    def check_layout(self, freeze_base: bool, cp: int, tp: int) -> None:
        """One line, why, for the settings offline features cannot serve."""
        if not self.offline:
            return
        if not freeze_base:
            raise ConfigError(
                "features.mode=offline reads a frozen decoder's outputs computed once: set "
                "mtp.freeze_base=true (heads-only training), or features.mode=online"
            )
        if cp > 1 or tp > 1:
            raise ConfigError(
                "features.mode=offline feeds whole rows of stored h^0 to each rank: use "
                "parallel.cp=1 and parallel.tp=1 (parallel.dp may be any)"
            )
