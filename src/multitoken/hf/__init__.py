"""Multi-Token Prediction on Hugging Face transformers models (the ``multitoken[hf]`` extra).

* :class:`HFDecoder`: any supported transformers causal LM as a
  :class:`~multitoken.decoder.Decoder`, packing-exact (:mod:`multitoken.hf.adapter`).
* :func:`load_hf_mtp_model`: a local HF folder to an
  :class:`~multitoken.mtp_model.MTPModel`, with the MTP weights the folder carries in a
  released format (:mod:`multitoken.hf.formats`).
* :func:`export_run`: a multitoken run to an HF folder that transformers loads
  (:mod:`multitoken.hf.export`).
"""

from __future__ import annotations

try:
    import safetensors  # noqa: F401
    import transformers  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the environment
    from multitoken.errors import ConfigError

    raise ConfigError(
        f"multitoken.hf needs transformers 5.x and safetensors ({err}): pip install "
        "'multitoken[hf]'"
    ) from None

from multitoken.hf.adapter import (
    SUPPORTED_MODEL_TYPES,
    HFDecoder,
    HFLayerCache,
    init_mtp_weights,
    read_config,
)

__all__ = ["HFDecoder", "HFLayerCache", "SUPPORTED_MODEL_TYPES", "init_mtp_weights", "read_config"]
