"""Fingerprints derived from config.json agree with the real modules transformers builds."""

from __future__ import annotations

import pytest
import torch

from services.common.errors import InvalidArgument
from services.common.tiny_model import ARCHES, build_config
from services.registry.fingerprint import MODULES, fingerprint_from_config


@pytest.mark.parametrize("arch", sorted(ARCHES))
@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_module_shapes_match_the_instantiated_model(arch, preset):
    config = build_config(preset, arch)
    fingerprint = fingerprint_from_config(config.to_dict())
    with torch.device("meta"):
        model = ARCHES[arch][1](config)
    layer = model.model.layers[0]
    for name in MODULES:
        parent = layer.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
        linear = getattr(parent, name)
        shape = fingerprint.module(name)
        assert (shape.in_features, shape.out_features) == (linear.in_features, linear.out_features), name
    assert fingerprint.num_layers == config.num_hidden_layers and fingerprint.model_type == arch


def test_digest_depends_on_shapes_only():
    base = build_config("tiny", "llama").to_dict()
    same = fingerprint_from_config({**base, "rms_norm_eps": 1e-5, "transformers_version": "x"})
    assert same.digest == fingerprint_from_config(base).digest
    assert fingerprint_from_config({**base, "num_hidden_layers": 3}).digest != same.digest


@pytest.mark.parametrize(("change", "message"), [
    ({"model_type": "gpt2"}, "not supported"),
    ({"hidden_size": 0}, "'hidden_size' must be a positive integer"),
    ({"num_hidden_layers": None}, "'num_hidden_layers'"),
    ({"hidden_size": 65, "head_dim": None}, "not divisible"),
])
def test_unusable_configs_are_refused(change, message):
    with pytest.raises(InvalidArgument, match=message):
        fingerprint_from_config({**build_config("tiny", "llama").to_dict(), **change})
