"""adapter_config.json: what PEFT wrote, checked against what we can serve.

We serve plain LoRA on the Llama family's linear modules. Per-module ranks and alphas
(rank_pattern / alpha_pattern) are served: the patterns are checked here and resolved per
module, as peft does, by services/common/lora_patterns.py; inference nodes pad every module
to the adapter's largest rank (one rank per adapter in the pool, DESIGN.md §3). PEFT features
that change the math otherwise are refused by name rather than silently ignored: DoRA, LoRA
biases, fan_in_fan_out, extra trainable modules, layer replication, and the like.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import PurePosixPath

from services.common.errors import InvalidArgument
from services.common.lora_patterns import MAX_ALPHA, PATTERN_FIELDS, LoraPatterns
from services.registry.validation.archive import CONFIG_FILE

DEFAULT_ALPHA = 8  # PEFT's LoraConfig default

# field -> why it is refused when set (truthy).
UNSUPPORTED_FEATURES = {
    "use_dora": "DoRA (weight-decomposed LoRA) is not supported",
    "lora_bias": "LoRA bias terms (lora_bias) are not supported",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D-style transposed weights) is not supported",
    "modules_to_save": "modules_to_save (fully trained extra modules) is not supported",
    "layer_replication": "layer_replication is not supported",
    "trainable_token_indices": "trainable_token_indices is not supported",
    "target_parameters": "target_parameters (LoRA on raw parameters) is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "use_qalora": "QA-LoRA is not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
}


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    #: The config's r and lora_alpha: what modules no rank_pattern / alpha_pattern key matches get.
    rank: int
    alpha: float
    use_rslora: bool
    #: Module names when target_modules is a list; None for a regex string or "all-linear".
    target_modules: tuple[str, ...] | None
    base_model_name_or_path: str
    #: The config as stored and served: sorted keys, compact separators; pattern dicts keep their order.
    normalized_json: str
    patterns: LoraPatterns


def _invalid(message: str, reason: str = "BAD_ADAPTER_CONFIG", **metadata: object) -> InvalidArgument:
    return InvalidArgument(f"{CONFIG_FILE}: {message}", reason=reason, file=CONFIG_FILE, **metadata)


def _normalized_json(config: dict) -> str:
    """Keys sorted at every level (equal configs, equal text: the upload's identity), except inside
    rank_pattern and alpha_pattern, whose order decides which key wins (lora_patterns.py)."""
    def canonical(value):
        return json.loads(json.dumps(value, sort_keys=True))  # sorts nested objects; key order survives loads
    ordered = {key: config[key] if key in PATTERN_FIELDS else canonical(config[key]) for key in sorted(config)}
    return json.dumps(ordered, separators=(",", ":"))


def parse_lora_config(data: bytes, max_rank: int) -> LoraSpec:
    try:
        config = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise _invalid(f"is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise _invalid(f"is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:  # an integer of over 4300 digits; absurdly deep nesting
        raise _invalid(f"is not usable JSON ({type(exc).__name__}: {str(exc)[:120]})") from None
    if not isinstance(config, dict):
        raise _invalid(f"must be a JSON object, got {type(config).__name__}")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise _invalid(f"peft_type is {peft_type!r}; expected 'LORA'", reason="UNSUPPORTED_PEFT_TYPE",
                       field="peft_type", expected="LORA", actual=peft_type)
    task_type = config.get("task_type")
    if task_type not in (None, "CAUSAL_LM"):
        raise _invalid(f"task_type is {task_type!r}; expected 'CAUSAL_LM'", field="task_type",
                       expected="CAUSAL_LM", actual=task_type)
    for field, why in UNSUPPORTED_FEATURES.items():
        if config.get(field):
            raise _invalid(f"{why} (field {field} = {json.dumps(config[field])[:80]})",
                           reason="UNSUPPORTED_LORA_FEATURE", field=field, expected="unset", actual=config[field])
    if config.get("bias", "none") != "none":
        raise _invalid(f"bias is {config['bias']!r}; expected 'none' (trained biases are not supported)",
                       reason="UNSUPPORTED_LORA_FEATURE", field="bias", expected="none", actual=config["bias"])
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise _invalid(f"r must be a positive integer, got {rank!r}", field="r", expected="integer >= 1",
                       actual=rank)
    if rank > max_rank:
        raise _invalid(f"rank r={rank} is above this registry's limit of {max_rank}", reason="RANK_TOO_LARGE",
                       field="r", expected=f"<= {max_rank}", actual=rank)
    alpha = config.get("lora_alpha", DEFAULT_ALPHA)
    # Compared, not converted: float(10**400) overflows, and `not 0 < x` also refuses NaN.
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha <= MAX_ALPHA:
        raise _invalid(f"lora_alpha must be a positive number of at most {MAX_ALPHA:.7g}, got {alpha!r:.60}",
                       field="lora_alpha", expected=f"> 0 and <= {MAX_ALPHA:.7g}", actual=f"{alpha!r:.60}")
    use_rslora = config.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise _invalid(f"use_rslora must be true or false, got {use_rslora!r}", field="use_rslora")
    targets = config.get("target_modules")
    target_modules = tuple(targets) if isinstance(targets, list) and all(isinstance(t, str) for t in targets) else None
    base = config.get("base_model_name_or_path") or ""
    if not isinstance(base, str):
        raise _invalid(f"base_model_name_or_path must be a string, got {base!r}", field="base_model_name_or_path")
    try:
        patterns = LoraPatterns.from_config(config, rank, float(alpha), max_rank)
    except InvalidArgument as exc:
        raise _invalid(exc.message, reason=exc.reason, **exc.metadata) from None
    return LoraSpec(rank, float(alpha), use_rslora, target_modules, base, _normalized_json(config), patterns)


def _last_part(path: str) -> str:
    return PurePosixPath(path.rstrip("/")).name if path else ""


def check_base_model_reference(spec: LoraSpec, base_name: str, base_location: str, override: bool) -> None:
    """The adapter's base_model_name_or_path must name the registered base (or be empty), unless overridden.

    Training machines keep checkpoints in different folders, so besides the exact name or
    location we accept a path whose last part equals the last part of either.
    """
    claimed = spec.base_model_name_or_path
    if not claimed or override:
        return
    accepted = {base_name, base_location.rstrip("/"), _last_part(base_location)} - {""}
    if claimed.rstrip("/") in accepted or _last_part(claimed) in accepted:
        return
    raise _invalid(f"base_model_name_or_path is {claimed!r}, which is not base model '{base_name}' "
                   f"(location {base_location!r}); set override_base_model_check to accept it when the shapes match",
                   reason="BASE_MODEL_MISMATCH", field="base_model_name_or_path", expected=base_name, actual=claimed)
