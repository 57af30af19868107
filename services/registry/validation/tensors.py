"""adapter_model.safetensors, parsed by hand and checked against the base model.

The safetensors format is an 8-byte little-endian header length, a JSON header
{name: {dtype, shape, data_offsets: [begin, end]}} and the raw bytes. We parse it ourselves
(never torch.load, never pickle), check the layout is exactly what the spec allows
(offsets inside the data, contiguous, lengths equal to shape x dtype size), then map every
tensor to (layer, module, A|B), check shapes against the fingerprint, and scan the raw bits
for NaN/Inf through a read-only memory map: an IEEE value is non-finite exactly when all its
exponent bits are set, which works for bf16 too without a bf16-aware library.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import re
import struct
from pathlib import Path

import numpy as np

from services.common.errors import InvalidArgument
from services.common.lora_patterns import ModuleLora
from services.registry.fingerprint import ATTENTION_MODULES, MLP_MODULES, MODULES, ArchitectureFingerprint
from services.registry.validation.archive import CONFIG_FILE, WEIGHTS_FILE
from services.registry.validation.lora_config import LoraSpec

# Real adapter headers are kilobytes (a 128-layer model: ~270 KB); refuse anything absurd early.
MAX_HEADER_BYTES = 8 * 1024 * 1024
# dtype -> (bytes per element, unsigned view, exponent mask, mantissa mask)
FLOAT_DTYPES = {
    "F32": (4, np.uint32, 0x7F800000, 0x007FFFFF),
    "F16": (2, np.uint16, 0x7C00, 0x03FF),
    "BF16": (2, np.uint16, 0x7F80, 0x007F),
}
OTHER_DTYPE_SIZES = {"F64": 8, "I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1,
                     "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.([A-Za-z0-9_]+)\.lora_([AB])\.weight$")
_PARENT = {**{m: "self_attn" for m in ATTENTION_MODULES}, **{m: "mlp" for m in MLP_MODULES}}
_SPECIAL_KEYS = (
    ("lora_embedding_", "embedding LoRA (lora_embedding_A/B) is not supported"),
    ("lora_magnitude_vector", "DoRA magnitude vectors are not supported"),
    (".lora_A.bias", "LoRA bias terms are not supported"),
    (".lora_B.bias", "LoRA bias terms are not supported"),
)


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offsets
    end: int


def _invalid(message: str, reason: str = "BAD_WEIGHTS", **metadata: object) -> InvalidArgument:
    return InvalidArgument(f"{WEIGHTS_FILE}: {message}", reason=reason, file=WEIGHTS_FILE, **metadata)


def read_header(path: Path, size: int) -> list[TensorEntry]:
    """Parses and structurally checks the header; returns the tensors in file order."""
    with open(path, "rb") as source:
        head = source.read(8)
        if len(head) < 8:
            raise _invalid(f"is {size} bytes, too short for a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, MAX_HEADER_BYTES):
            # Only now is the pickle/zip signature meaningful: a valid header length may start with 0x80.
            if head.startswith((b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")):
                raise _invalid("is a PyTorch pickle/zip checkpoint, not safetensors; pickles are never loaded "
                               "(save with safe_serialization=True)", reason="PICKLE_REFUSED")
            raise _invalid(f"declares a {length}-byte header but the file is {size} bytes", reason="BAD_SAFETENSORS",
                           expected=f"<= {min(size - 8, MAX_HEADER_BYTES)}", actual=length)
        raw = source.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    # ValueError covers bad UTF-8, bad JSON and integers of over 4300 digits; RecursionError, absurd nesting.
    except (ValueError, RecursionError) as exc:
        raise _invalid(f"header is not valid JSON ({str(exc)[:200]})", reason="BAD_SAFETENSORS") from None
    if not isinstance(header, dict):
        raise _invalid("header is not a JSON object", reason="BAD_SAFETENSORS")
    header.pop("__metadata__", None)
    data_start, data_len = 8 + length, size - 8 - length
    entries = [_entry(name, spec, data_start, data_len) for name, spec in header.items()]
    entries.sort(key=lambda e: e.begin)
    position = data_start
    for entry in entries:
        if entry.begin != position:
            raise _invalid(f"tensor '{entry.name}' starts at byte {entry.begin - data_start} of the data; expected "
                           f"{position - data_start} (tensors must be contiguous and must not overlap)",
                           reason="BAD_SAFETENSORS", tensor=entry.name)
        position = entry.end
    if position != size:
        raise _invalid(f"has {size - position} bytes after the last tensor", reason="BAD_SAFETENSORS")
    return entries


def _entry(name: str, spec: object, data_start: int, data_len: int) -> TensorEntry:
    if not isinstance(spec, dict):
        raise _invalid(f"header entry '{name}' is not an object", reason="BAD_SAFETENSORS", tensor=name)
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise _invalid(f"tensor '{name}' has an invalid shape {shape!r}", reason="BAD_SAFETENSORS", tensor=name)
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len):
        raise _invalid(f"tensor '{name}' has data_offsets {offsets!r} outside the {data_len}-byte data section",
                       reason="BAD_SAFETENSORS", tensor=name)
    if dtype not in FLOAT_DTYPES:
        known = "a known dtype" if dtype in OTHER_DTYPE_SIZES else "an unknown dtype"
        raise _invalid(f"tensor '{name}' has dtype {dtype!r} ({known}); expected F32, F16 or BF16",
                       reason="BAD_DTYPE", tensor=name, expected="F32|F16|BF16", actual=dtype)
    expected = math.prod(shape) * FLOAT_DTYPES[dtype][0]
    if offsets[1] - offsets[0] != expected:
        raise _invalid(f"tensor '{name}' holds {offsets[1] - offsets[0]} bytes; shape {shape} of {dtype} needs "
                       f"{expected}", reason="BAD_SAFETENSORS", tensor=name, expected=expected,
                       actual=offsets[1] - offsets[0])
    return TensorEntry(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _locate(entry: TensorEntry, fingerprint: ArchitectureFingerprint) -> tuple[int, str, str]:
    """(layer, module, "A"|"B") of a tensor, or INVALID_ARGUMENT saying why it is not ours."""
    for marker, why in _SPECIAL_KEYS:
        if marker in entry.name:
            raise _invalid(f"tensor '{entry.name}': {why}", reason="UNSUPPORTED_LORA_FEATURE", tensor=entry.name)
    match = _KEY.match(entry.name)
    if not match:
        raise _invalid(f"tensor '{entry.name}' is not a LoRA weight of a decoder layer; expected names like "
                       "'base_model.model.model.layers.<i>.self_attn.q_proj.lora_A.weight'",
                       reason="UNKNOWN_TENSOR", tensor=entry.name)
    layer, parent, module, side = int(match[1]), match[2], match[3], match[4]
    if _PARENT.get(module) != parent:
        raise _invalid(f"tensor '{entry.name}' targets unknown module '{parent}.{module}'; expected one of "
                       + ", ".join(f"{_PARENT[m]}.{m}" for m in MODULES), reason="UNKNOWN_MODULE",
                       tensor=entry.name, expected="|".join(MODULES), actual=module)
    if layer >= fingerprint.num_layers:
        raise _invalid(f"tensor '{entry.name}' is for layer {layer}, but the base model has "
                       f"{fingerprint.num_layers} layers (0..{fingerprint.num_layers - 1})",
                       reason="LAYER_OUT_OF_RANGE", tensor=entry.name,
                       expected=f"< {fingerprint.num_layers}", actual=layer)
    return layer, module, side


@dataclasses.dataclass(frozen=True)
class CheckedTensors:
    #: The modules that carry weights, in canonical order.
    target_modules: list[str]
    #: The largest rank of any module: what the adapter occupies in a node's pool (one rank per adapter).
    rank: int


def _rank_source(module: ModuleLora) -> str:
    return f" from rank_pattern key {module.rank_key!r}" if module.rank_key is not None else ""


def check_tensors(entries: list[TensorEntry], fingerprint: ArchitectureFingerprint, spec: LoraSpec) -> CheckedTensors:
    """Shape and pairing checks, each module against its own rank (rank_pattern, else r)."""
    if not entries:
        raise _invalid("holds no tensors", reason="NO_TENSORS")
    located = [(entry, *_locate(entry, fingerprint)) for entry in sorted(entries, key=lambda e: e.name)]
    # The module's name in the base model, as peft matches rank_pattern / alpha_pattern keys against it.
    names = {(layer, module): f"model.layers.{layer}.{_PARENT[module]}.{module}" for _, layer, module, _ in located}
    try:
        resolved = spec.patterns.resolve(names.values())
    except InvalidArgument as exc:  # from adapter_config.json's patterns, though found while reading the weights
        raise InvalidArgument(f"{CONFIG_FILE}: {exc.message}", reason=exc.reason, file=CONFIG_FILE,
                              **exc.metadata) from None
    seen: dict[tuple[int, str], set[str]] = {}
    for entry, layer, module, side in located:  # name order: deterministic messages
        # PEFT matches target_modules entries by name suffix ("q_proj", "self_attn.q_proj", ...).
        if spec.target_modules is not None and module not in {t.rsplit(".", 1)[-1] for t in spec.target_modules}:
            raise _invalid(f"tensor '{entry.name}' targets {module}, which adapter_config.json target_modules "
                           f"{list(spec.target_modules)} does not list", reason="UNKNOWN_MODULE",
                           tensor=entry.name, expected="|".join(spec.target_modules), actual=module)
        shape, lora = fingerprint.module(module), resolved[names[layer, module]]
        expected = [lora.rank, shape.in_features] if side == "A" else [shape.out_features, lora.rank]
        meaning = "r x in_features" if side == "A" else "out_features x r"
        if list(entry.shape) != expected:
            raise _invalid(f"tensor '{entry.name}' has shape {list(entry.shape)}; expected {expected} "
                           f"({meaning} of {module} with r={lora.rank}{_rank_source(lora)})",
                           reason="SHAPE_MISMATCH", tensor=entry.name, expected=expected, actual=list(entry.shape))
        seen.setdefault((layer, module), set()).add(side)
    for (layer, module), sides in sorted(seen.items()):
        if sides != {"A", "B"}:
            missing = ({"A", "B"} - sides).pop()
            raise _invalid(f"layer {layer} {module} has lora_{sides.pop()} but no lora_{missing}",
                           reason="UNPAIRED_TENSOR", tensor=f"layers.{layer}.{module}.lora_{missing}")
    present = {module for _, module in seen}
    return CheckedTensors([module for module in MODULES if module in present],
                          max(lora.rank for lora in resolved.values()))


def check_finite(path: Path, entries: list[TensorEntry]) -> None:
    """INVALID_ARGUMENT naming the first tensor that holds a NaN or an Inf."""
    with open(path, "rb") as source, mmap.mmap(source.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        for entry in entries:
            if entry.end == entry.begin:
                continue
            width, view, exponent, mantissa = FLOAT_DTYPES[entry.dtype]
            bits = np.frombuffer(mapped, dtype=np.dtype(view).newbyteorder("<"),
                                 count=(entry.end - entry.begin) // width, offset=entry.begin)
            non_finite = (bits & exponent) == exponent
            if non_finite.any():
                nans = int(np.count_nonzero(non_finite & ((bits & mantissa) != 0)))
                infs = int(np.count_nonzero(non_finite)) - nans
                del bits, non_finite  # release the buffer before the map closes
                raise _invalid(f"tensor '{entry.name}' holds {nans} NaN and {infs} Inf values; every value must "
                               "be finite", reason="NON_FINITE", tensor=entry.name, expected="finite",
                               actual=f"{nans} NaN, {infs} Inf")
            del bits, non_finite
