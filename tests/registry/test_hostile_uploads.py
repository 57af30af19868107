"""Every hostile or broken upload is refused with INVALID_ARGUMENT naming the file or tensor
and what was expected, and leaves nothing behind: no row, no blob, no event, no spool file.
Runs on every backend pair."""

from __future__ import annotations

import json
import pickle
import struct

import grpc
import numpy as np
import pytest

from services.common.pb.loraplex.registry.v1 import registry_pb2 as pb
from tests.registry.client import expect_error
from tests.registry.lora_files import (DROP, AdapterFiles, key, make_zip, raw_safetensors, zip_with_symlink)

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
Q_A = key(0, "q_proj", "A")


def _renamed(files: AdapterFiles, old: str, new: str) -> AdapterFiles:
    return files.mutate(lambda t: t.update({new: t.pop(old)}))


def _retyped(files: AdapterFiles, dtype) -> AdapterFiles:
    return files.mutate(lambda t: t.update({Q_A: t[Q_A].astype(dtype)}))


def _poisoned(files: AdapterFiles, value: float) -> AdapterFiles:
    def poison(tensors):
        tensors[Q_A][1, 3] = value
    return files.mutate(poison)


def _bomb(files: AdapterFiles) -> bytes:
    return make_zip({CONFIG: files.config, WEIGHTS: bytes(24 * 1024 * 1024)})


def _lying_header(files: AdapterFiles) -> bytes:
    return raw_safetensors({Q_A: {"dtype": "F32", "shape": [4, 64], "data_offsets": [0, 1024]}}, b"\0" * 16)


def _overlapping(files: AdapterFiles) -> bytes:
    header = {Q_A: {"dtype": "F32", "shape": [4, 64], "data_offsets": [0, 1024]},
              key(0, "q_proj", "B"): {"dtype": "F32", "shape": [64, 4], "data_offsets": [512, 1536]}}
    return raw_safetensors(header, b"\0" * 1536)


def _raw_header(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


# name -> (build(files) -> zip bytes, or (bytes, upload kwargs)), substrings the message must contain
CASES = {
    "pickle_bin": (lambda f: make_zip({CONFIG: f.config, "adapter_model.bin": pickle.dumps({"w": [1.0]})}),
                   ["adapter_model.bin", "pickle"]),
    "pickle_disguised": (lambda f: make_zip({CONFIG: f.config, WEIGHTS: pickle.dumps({"w": [1.0]}, protocol=4)}),
                         [WEIGHTS, "pickle"]),
    "path_traversal": (lambda f: make_zip({"../" + CONFIG: f.config, WEIGHTS: f.weights}), ["../" + CONFIG, ".."]),
    "absolute_path": (lambda f: make_zip({"/tmp/" + CONFIG: f.config, WEIGHTS: f.weights}),
                      ["/tmp/" + CONFIG, "absolute"]),
    "symlink": (lambda f: zip_with_symlink(f), [WEIGHTS, "symbolic link"]),
    "zip_bomb": (_bomb, [WEIGHTS, "zip bomb", "at most 200x"]),
    "extra_file": (lambda f: f.zip(extra={"train.py": b"print(1)"}), ["train.py", "unexpected file"]),
    "too_many_entries": (lambda f: make_zip({**{f"d{i}/": b"" for i in range(9)}, CONFIG: f.config,
                                             WEIGHTS: f.weights}), ["11 entries", "at most 8"]),
    "missing_weights": (lambda f: make_zip({CONFIG: f.config}), [WEIGHTS]),
    "not_a_zip": (lambda f: b"this is not a zip file at all", ["not a readable zip"]),
    "two_folders": (lambda f: make_zip({"a/" + CONFIG: f.config, "b/" + WEIGHTS: f.weights}), ["several folders"]),
    "wrong_shape": (lambda f: f.mutate(lambda t: t.update({Q_A: t[Q_A][:, :32].copy()})).zip(),
                    [Q_A, "[4, 32]", "expected [4, 64]"]),
    "rank_differs_from_config": (lambda f: f.with_config(r=8).zip(), [key(0, "down_proj", "A"), "[4, 128]",
                                                                     "expected [8, 128]"]),
    "dtype_int8": (lambda f: _retyped(f, np.int8).zip(), [Q_A, "'I8'", "F32, F16 or BF16"]),
    "dtype_fp64": (lambda f: _retyped(f, np.float64).zip(), [Q_A, "'F64'", "F32, F16 or BF16"]),
    "nan": (lambda f: _poisoned(f, np.nan).zip(), [Q_A, "1 NaN"]),
    "inf": (lambda f: _poisoned(f, -np.inf).zip(), [Q_A, "1 Inf"]),
    "nan_fp16": (lambda f: _poisoned(_retyped(f, np.float16), np.nan).zip(), [Q_A, "1 NaN"]),
    "rank_above_max": (lambda f: f.with_config(r=300).zip(), [CONFIG, "r=300", "limit of 256"]),
    "layer_out_of_range": (lambda f: _renamed(f, key(1, "q_proj", "A"), key(7, "q_proj", "A")).zip(),
                           [key(7, "q_proj", "A"), "layer 7", "2 layers"]),
    "unknown_module": (lambda f: _renamed(f, Q_A, Q_A.replace("q_proj", "rotary_proj")).zip(),
                       ["rotary_proj", "unknown module"]),
    "module_under_wrong_parent": (lambda f: _renamed(f, Q_A, Q_A.replace("self_attn", "mlp")).zip(),
                                  ["mlp.q_proj", "unknown module"]),
    "not_a_layer_tensor": (lambda f: _renamed(f, Q_A, "base_model.model.lm_head.lora_A.weight").zip(),
                           ["base_model.model.lm_head.lora_A.weight", "not a LoRA weight"]),
    "embedding_lora": (lambda f: _renamed(f, Q_A, "base_model.model.model.embed_tokens.lora_embedding_A").zip(),
                       ["lora_embedding_A", "embedding LoRA"]),
    "dora_magnitude": (lambda f: f.mutate(lambda t: t.update({
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": np.ones(64, np.float32)})).zip(),
        ["lora_magnitude_vector", "DoRA"]),
    "dora_config": (lambda f: f.with_config(use_dora=True).zip(), [CONFIG, "DoRA", "use_dora"]),
    "rank_pattern_disagrees": (lambda f: f.with_config(rank_pattern={"q_proj": 8}).zip(),
                               [Q_A, "[4, 64]", "expected [8, 64]", "from rank_pattern key 'q_proj'"]),
    "bias": (lambda f: f.with_config(bias="all").zip(), [CONFIG, "bias is 'all'"]),
    "peft_type": (lambda f: f.with_config(peft_type="IA3").zip(), [CONFIG, "peft_type is 'IA3'", "'LORA'"]),
    "negative_alpha": (lambda f: f.with_config(lora_alpha=-1).zip(), [CONFIG, "lora_alpha"]),
    "missing_rank": (lambda f: f.with_config(r=DROP).zip(), [CONFIG, "r must be a positive integer"]),
    "config_not_json": (lambda f: AdapterFiles(b"{not json", f.weights).zip(), [CONFIG, "not valid JSON"]),
    "targets_disagree": (lambda f: f.with_config(target_modules=["v_proj"]).zip(),
                         [key(0, "down_proj", "A"), "target_modules ['v_proj'] does not list"]),
    "wrong_base_model": (lambda f: f.with_config(base_model_name_or_path="meta-llama/Llama-3-8B").zip(),
                         [CONFIG, "meta-llama/Llama-3-8B", "override_base_model_check"]),
    "unpaired": (lambda f: f.mutate(lambda t: t.pop(key(1, "down_proj", "B"))).zip(),
                 [WEIGHTS, "layer 1 down_proj has lora_A but no lora_B"]),
    "no_tensors": (lambda f: f.with_tensors({}).zip(), [WEIGHTS, "no tensors"]),
    "lying_header": (lambda f: AdapterFiles(f.config, _lying_header(f)).zip(), [WEIGHTS, Q_A, "data_offsets"]),
    "overlapping_tensors": (lambda f: AdapterFiles(f.config, _overlapping(f)).zip(), [WEIGHTS, "contiguous"]),
    "header_too_long": (lambda f: AdapterFiles(f.config, b"\xff" * 8 + f.weights).zip(), [WEIGHTS, "header"]),
    "files_size_mismatch": (lambda f: (f.config + f.weights, {
        "archive": pb.ADAPTER_ARCHIVE_FILES, "files": [(CONFIG, len(f.config)), (WEIGHTS, len(f.weights) + 5)]}),
        ["received", "declares"]),
    "files_pickle": (lambda f: (f.config + b"x" * 10, {
        "archive": pb.ADAPTER_ARCHIVE_FILES, "files": [(CONFIG, len(f.config)), ("adapter_model.bin", 10)]}),
        ["adapter_model.bin", "pickle"]),
    "files_missing_config": (lambda f: (f.weights, {
        "archive": pb.ADAPTER_ARCHIVE_FILES, "files": [(WEIGHTS, len(f.weights))]}), [CONFIG]),
    "files_too_large": (lambda f: (f.weights, {
        "archive": pb.ADAPTER_ARCHIVE_FILES, "files": [(CONFIG, 10), (WEIGHTS, 2 << 40)]}), ["limited to"]),
    "content_sha256": (lambda f: (f.zip(), {"content_sha256": "0" * 64}), ["content_sha256", "does not match"]),
    "unspecified_archive": (lambda f: (f.zip(), {"archive": pb.ADAPTER_ARCHIVE_UNSPECIFIED}), ["header.archive"]),
    "bad_name": (lambda f: (f.zip(), {"name": "no spaces allowed"}), ["adapter name", "no spaces allowed"]),
    "name_trailing_newline": (lambda f: (f.zip(), {"name": "fin\n"}), ["adapter name", "'fin\\n'"]),
    "alpha_overflows_a_float": (lambda f: f.with_config(lora_alpha=10**400).zip(), [CONFIG, "lora_alpha"]),
    "alpha_above_float32": (lambda f: f.with_config(lora_alpha=1e39).zip(), [CONFIG, "lora_alpha", "at most"]),
    "config_deeply_nested": (lambda f: AdapterFiles(b"[" * 100_000 + b"]" * 100_000, f.weights).zip(),
                             [CONFIG, "not usable JSON"]),
    "config_integer_too_long": (lambda f: AdapterFiles(b'{"r": ' + b"1" * 5000 + b"}", f.weights).zip(),
                                [CONFIG, "not usable JSON"]),
    "header_deeply_nested": (lambda f: AdapterFiles(f.config, _raw_header(b"[" * 100_000 + b"]" * 100_000)).zip(),
                             [WEIGHTS, "not valid JSON"]),
    "empty_body": (lambda f: (b"", {}), ["no bytes"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_upload_is_refused_and_leaves_nothing(registry, tenant, peft_adapter, case):
    build, expected = CASES[case]
    built = build(peft_adapter)
    data, kwargs = built if isinstance(built, tuple) else (built, {})
    kwargs = {"name": "hostile", **kwargs}
    before = registry.counts()
    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, tenant.upload_bytes, data, **kwargs)
    for part in expected:
        assert part in error.details(), f"{part!r} not in {error.details()!r}"
    assert registry.counts() == before


def test_first_message_must_be_the_header(registry, tenant, peft_adapter):
    before = registry.counts()
    call = registry.stub.UploadAdapter
    messages = iter([pb.UploadAdapterRequest(chunk=b"abc")])
    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, call, messages,
                         metadata=[("authorization", f"Bearer {tenant.token}")])
    assert "first UploadAdapter message must be the header" in error.details()
    two_headers = iter([pb.UploadAdapterRequest(header=pb.UploadAdapterHeader(
        name="x", base_model="tiny", archive=pb.ADAPTER_ARCHIVE_ZIP))] * 2)
    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, call, two_headers,
                         metadata=[("authorization", f"Bearer {tenant.token}")])
    assert "only the first" in error.details()
    assert registry.counts() == before


def test_refusals_carry_error_info_with_expected_and_actual(registry, tenant, peft_adapter):
    from services.common.rpc import error_info

    build, _ = CASES["wrong_shape"]
    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, tenant.upload_bytes, build(peft_adapter), name="x")
    info = error_info(error)
    assert info.reason == "SHAPE_MISMATCH" and info.domain == "loraplex"
    assert info.metadata["tensor"] == Q_A
    assert json.loads(info.metadata["expected"]) == [4, 64] and json.loads(info.metadata["actual"]) == [4, 32]
