"""Validation pieces on their own (no server): body splitting, NaN/Inf bit checks for every
float type, PEFT target names, and zip entries that lie about their size."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from services.common.errors import InvalidArgument
from services.common.tiny_model import build_config
from services.registry.fingerprint import fingerprint_from_config
from services.registry.validation import UploadLimits, UploadReceiver
from services.registry.validation.archive import unpack_zip
from services.registry.validation.lora_config import parse_lora_config
from services.registry.validation.tensors import check_finite, check_tensors, read_header
from tests.registry.lora_files import make_zip, raw_safetensors, to_bf16

LIMITS = UploadLimits(max_upload_bytes=64 << 20, max_rank=64, max_archive_files=8, max_zip_ratio=200)


def test_files_bodies_are_split_as_they_arrive_in_any_order(tmp_path, peft_adapter):
    files = [("adapter_model.safetensors", len(peft_adapter.weights)), ("adapter_config.json",
                                                                         len(peft_adapter.config))]
    receiver = UploadReceiver(tmp_path, "files", files, LIMITS.max_upload_bytes, hash_body=False)
    body = peft_adapter.weights + peft_adapter.config
    for start in range(0, len(body), 777):  # chunk borders fall anywhere, across the two files
        receiver.write(body[start:start + 777])
    receiver.write(b"")
    receiver.close()
    unpacked = receiver.unpack(LIMITS)
    assert unpacked.config_bytes == peft_adapter.config
    assert unpacked.weights_path.read_bytes() == peft_adapter.weights
    with pytest.raises(InvalidArgument, match="received more than"):
        receiver.write(b"x")


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize(("value", "message"), [(np.nan, "1 NaN and 0 Inf"), (np.inf, "0 NaN and 1 Inf"),
                                                (-np.inf, "0 NaN and 1 Inf")])
def test_non_finite_values_are_found_in_every_float_type(tmp_path, dtype, value, message):
    values = np.zeros(37, np.float32)
    values[-1] = value
    if dtype == "F32":
        raw = values.tobytes()
    elif dtype == "F16":
        raw = values.astype(np.float16).tobytes()
    else:
        raw = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    path = tmp_path / "w.safetensors"
    data = raw_safetensors({"t": {"dtype": dtype, "shape": [37], "data_offsets": [0, len(raw)]}}, raw)
    path.write_bytes(data)
    entries = read_header(path, len(data))
    with pytest.raises(InvalidArgument, match=message):
        check_finite(path, entries)
    values[-1] = 65504.0 if dtype == "F16" else 3.0e38  # the largest finite values pass
    finite = raw_safetensors({"t": {"dtype": "F32", "shape": [37], "data_offsets": [0, 148]}}, values.tobytes())
    path.write_bytes(finite)
    check_finite(path, read_header(path, len(finite)))


def test_bf16_adapters_pass_and_dotted_target_names_match(tmp_path, peft_adapter):
    targets = [f"self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj", "o_proj")] + ["gate_proj", "up_proj",
                                                                                       "mlp.down_proj"]
    files = to_bf16(peft_adapter.with_config(target_modules=targets))
    path = tmp_path / "w.safetensors"
    path.write_bytes(files.weights)
    entries = read_header(path, len(files.weights))
    fingerprint = fingerprint_from_config(build_config("tiny", "llama").to_dict())
    modules = check_tensors(entries, fingerprint, parse_lora_config(files.config, 64)).target_modules
    assert modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    check_finite(path, entries)


def test_a_zip_entry_that_lies_about_its_size_is_refused(tmp_path, peft_adapter):
    data = bytearray(make_zip({"adapter_config.json": peft_adapter.config,
                               "adapter_model.safetensors": peft_adapter.weights}))
    # The weights' central-directory record: the last record header before the last occurrence of its name.
    entry = data.rfind(b"PK\x01\x02", 0, data.rfind(b"adapter_model.safetensors"))
    (declared,) = struct.unpack_from("<I", data, entry + 24)
    struct.pack_into("<I", data, entry + 24, declared // 2)  # claims half the real size
    (tmp_path / "upload.zip").write_bytes(bytes(data))
    with pytest.raises(InvalidArgument, match="cannot be read"):
        unpack_zip(tmp_path / "upload.zip", tmp_path, LIMITS)
