"""Released MTP weight formats: exact names in, a run, the same bits out; bad keys refused."""

import json

import pytest
import torch
import transformers  # noqa: F401  (make setup installs the [hf] extra; fail loudly without it)
from safetensors.torch import save_file

from multitoken import MTPConfig, MTPModel
from multitoken.errors import CheckpointError
from multitoken.hf import HFDecoder, init_mtp_weights
from multitoken.hf.weights import (
    load_hf_mtp_model,
    load_mtp_weights,
    mtp_tensors,
    read_tensors,
    save_pretrained,
)
from multitoken.testing.tiny_hf import save_tiny, tiny_model

L = 2  # layers of the tiny models
H = 32


def block_keys(model_type="llama"):
    """The decoder layer's own parameter names, from a fresh transformers model."""
    hf = tiny_model(model_type)
    return [
        k.removeprefix("model.layers.0.")
        for k in hf.state_dict()
        if k.startswith("model.layers.0.")
    ]


def released_names(fmt, depth, model_type="llama"):
    """The key names as the issue and DESIGN.md section 9 spell them."""
    names = []
    for k in range(depth):
        if fmt == "deepseek":
            p = f"model.layers.{L + k}."
            heads = ["enorm", "hnorm", "eh_proj", "shared_head.norm"]
            names += [p + "embed_tokens.weight", p + "shared_head.head.weight"]
        elif fmt == "qwen3_next":
            p = "mtp."
            heads = ["fc", "pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"]
        else:
            p = f"model.mtp_layers.{k}."
            heads = ["token_layernorm", "hidden_layernorm", "input_proj", "final_layernorm"]
        names += [f"{p}{h}.weight" for h in heads]
        block = "mtp.layers.0." if fmt == "qwen3_next" else p
        names += [block + key for key in block_keys(model_type)]
    return names


def synthetic(names, model):
    """Random tensors under ``names``, shaped like the model needs them."""
    gen = torch.Generator().manual_seed(7)
    state = model.decoder.model.state_dict()
    layer0 = {k.removeprefix("model.layers.0."): v for k, v in state.items() if ".layers.0." in k}
    out = {}
    for name in names:
        block_key = next((k for k in layer0 if name.endswith("." + k)), None)
        if name.endswith(("embed_tokens.weight", "shared_head.head.weight")):
            shared = state["model.embed_tokens.weight" if "embed" in name else "lm_head.weight"]
            out[name] = shared.clone()
        elif block_key is not None and "norm" not in block_key:
            out[name] = torch.randn(layer0[block_key].shape, generator=gen)
        elif name.endswith(("eh_proj.weight", "fc.weight", "input_proj.weight")):
            out[name] = torch.randn(H, 2 * H, generator=gen)
        else:  # a norm: plain weights near 1; Qwen3-Next stores them zero-centred (w - 1)
            size = layer0[block_key].shape if block_key else (H,)
            plain = 0.75 + 0.5 * torch.rand(size, generator=gen)
            out[name] = plain - 1 if name.startswith("mtp.") else plain
    return out


def write_folder(tmp_path, fmt, depth, tensors=None, config_entries=None, model_type="llama"):
    folder = save_tiny(model_type, tmp_path / "model")
    model = MTPModel(HFDecoder.from_pretrained(folder), MTPConfig(num_depths=depth))
    tensors = (
        synthetic(released_names(fmt, depth, model_type), model) if tensors is None else tensors
    )
    base = read_tensors(folder)
    save_file({**base, **tensors}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    key = "mtp_num_hidden_layers" if fmt == "qwen3_next" else "num_nextn_predict_layers"
    config.update({key: depth} if config_entries is None else config_entries)
    (folder / "config.json").write_text(json.dumps(config))
    return folder, tensors


CASES = [("deepseek", 1), ("deepseek", 2), ("qwen3_next", 1), ("mimo", 1), ("mimo", 2)]


@pytest.mark.parametrize("fmt,depth", CASES)
def test_released_names_load_run_and_save_back_bit_exact(tmp_path, fmt, depth):
    folder, tensors = write_folder(tmp_path, fmt, depth)
    model = load_hf_mtp_model(folder, MTPConfig(num_depths=depth))
    # Loaded, not initialised: the projection is the file's (columns swapped for MiMo).
    eh = model.mtp.depths[0].eh_proj.weight
    name = {"deepseek": f"model.layers.{L}.eh_proj.weight", "qwen3_next": "mtp.fc.weight"}.get(
        fmt, "model.mtp_layers.0.input_proj.weight"
    )
    expected = tensors[name]
    if fmt == "mimo":
        expected = torch.cat([expected[:, H:], expected[:, :H]], 1)
    assert torch.equal(eh, expected)
    hidden = model(torch.randint(2, 97, (1, 10)))
    assert len(hidden) == depth + 1 and all(torch.isfinite(h).all() for h in hidden)
    out, entries = mtp_tensors(model, fmt)
    assert set(out) == set(tensors)
    for key, value in tensors.items():
        assert torch.equal(out[key], value), key
    save_pretrained(model, tmp_path / "again", fmt)
    again = read_tensors(tmp_path / "again")
    for key, value in tensors.items():
        assert torch.equal(again[key], value), key
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert all(config[k] == v for k, v in entries.items())


def test_mimo_order_is_hidden_first():
    # A model concatenating [emb; hid] saved as MiMo and loaded into a [hid; emb] model computes
    # the same depth outputs: the column swap is the order change, nothing else.
    torch.manual_seed(0)
    a = MTPModel(HFDecoder(tiny_model("llama")), MTPConfig(num_depths=2))
    init_mtp_weights(a)
    b = MTPModel(HFDecoder(tiny_model("llama")), MTPConfig(num_depths=2, hidden_first=True))
    from multitoken.hf.formats import from_format
    from multitoken.hf.weights import depth_states

    tensors, _ = mtp_tensors(a, "mimo")
    states = from_format(tensors, "mimo", template=depth_states(b), num_layers=L, hidden_first=True)
    for module, state in zip(b.mtp.depths, states):
        module.load_state_dict(state)
    ids = torch.randint(2, 97, (1, 12))
    with torch.no_grad():
        for x, y in zip(a(ids), b(ids)):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "change,match",
    [
        (
            "rename",
            r"missing \['model\.layers\.2\.enorm\.weight'\]; "
            r"unexpected \['model\.layers\.2\.enorm_x\.weight'\]",
        ),
        ("stray", r"belong to neither the model nor any MTP format .*: foo\.weight"),
        ("missing", r"missing \['model\.layers\.2\.hnorm\.weight'\]"),
        ("extra", r"unexpected \['model\.layers\.2\.mlp\.extra\.weight'\]"),
    ],
)
def test_renamed_missing_or_extra_key_fails_with_the_list(tmp_path, change, match):
    model = MTPModel(HFDecoder(tiny_model("llama")), MTPConfig(num_depths=1))
    tensors = synthetic(released_names("deepseek", 1), model)
    if change == "rename":
        tensors["model.layers.2.enorm_x.weight"] = tensors.pop("model.layers.2.enorm.weight")
    elif change == "stray":
        tensors["foo.weight"] = torch.zeros(2)
    elif change == "missing":
        del tensors["model.layers.2.hnorm.weight"]
    else:
        tensors["model.layers.2.mlp.extra.weight"] = torch.zeros(2)
    folder, _ = write_folder(tmp_path, "deepseek", 1, tensors)
    with pytest.raises(CheckpointError, match=match):
        load_hf_mtp_model(folder, MTPConfig(num_depths=1))


def test_keys_of_another_format_than_the_config_are_refused(tmp_path):
    model = MTPModel(HFDecoder(tiny_model("llama")), MTPConfig(num_depths=1))
    tensors = synthetic(released_names("qwen3_next", 1), model)
    folder, _ = write_folder(tmp_path, "deepseek", 1, tensors, {"num_nextn_predict_layers": 1})
    with pytest.raises(CheckpointError, match="qwen3_next MTP keys but config.json has no mtp_num"):
        load_hf_mtp_model(folder, MTPConfig(num_depths=1))


def test_depth_mismatch_names_the_fix(tmp_path):
    folder, _ = write_folder(tmp_path, "mimo", 2)
    with pytest.raises(CheckpointError, match="holds 2 MTP depth.*set mtp.num_depths=2"):
        load_hf_mtp_model(folder, MTPConfig(num_depths=1))


def test_qwen3_next_holds_one_depth():
    model = MTPModel(HFDecoder(tiny_model("llama")), MTPConfig(num_depths=2))
    with pytest.raises(CheckpointError, match="holds one depth"):
        mtp_tensors(model, "qwen3_next")


def test_load_mtp_weights_without_mtp_keys_is_a_no_op(tmp_path):
    folder = save_tiny("qwen2", tmp_path / "m")
    model = MTPModel(HFDecoder.from_pretrained(folder), MTPConfig(num_depths=1))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    assert load_mtp_weights(model, folder) is None
    after = model.state_dict()
    assert all(torch.equal(after[name], value) for name, value in before.items())
