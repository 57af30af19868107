"""SamplingParams: defaults, validation errors (field named), max_tokens capping rules."""

from __future__ import annotations

import math

import pytest

from services.common.errors import InvalidArgument
from services.inference.engine.sampling_params import DEFAULT_MAX_TOKENS, SamplingParams


def field_of(excinfo: pytest.ExceptionInfo) -> str:
    return excinfo.value.metadata["field"]


def test_from_request_applies_defaults_for_unset_fields():
    params = SamplingParams.from_request()
    assert params == SamplingParams()
    assert params.max_tokens == DEFAULT_MAX_TOKENS and not params.max_tokens_explicit
    assert params.temperature == 1.0 and params.top_p == 1.0 and params.top_k == 0
    assert params.stop == () and params.seed is None and not params.logprobs


def test_from_request_keeps_set_fields():
    params = SamplingParams.from_request(max_tokens=5, temperature=0.0, top_p=0.5, top_k=3, seed=7,
                                         stop=["a", "b"], logprobs=True, top_logprobs=2, ignore_eos=True)
    assert params.max_tokens == 5 and params.max_tokens_explicit
    assert params.is_greedy and params.stop == ("a", "b") and params.seed == 7
    assert params.top_logprobs == 2 and params.ignore_eos and params.wants_logprobs


def test_is_greedy_for_zero_or_numerically_zero_temperature():
    assert SamplingParams(temperature=0.0).is_greedy
    assert SamplingParams(temperature=1e-7).is_greedy  # logits / 1e-7 would overflow sampling
    assert not SamplingParams(temperature=0.7).is_greedy


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(temperature=math.inf), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=math.nan), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(stop=tuple(str(i) for i in range(17))), "stop"),
    (dict(stop=("ok", "")), "stop"),
    (dict(top_logprobs=21), "top_logprobs"),
    (dict(top_logprobs=-1), "top_logprobs"),
])
def test_bad_parameters_raise_invalid_argument_naming_the_field(kwargs, field):
    with pytest.raises(InvalidArgument) as excinfo:
        SamplingParams(**kwargs).validate(prompt_len=4, max_context=64)
    assert field_of(excinfo) == field


def test_edge_values_are_accepted():
    params = SamplingParams(top_p=1.0, top_k=0, temperature=0.0, top_logprobs=20,
                            stop=tuple(str(i) for i in range(16)), max_tokens=1)
    assert params.validate(prompt_len=4, max_context=64) == params


@pytest.mark.parametrize("prompt_len", [64, 65])
def test_prompt_that_fills_the_context_is_rejected(prompt_len):
    with pytest.raises(InvalidArgument, match=f"prompt of {prompt_len} tokens does not fit the context of 64") as e:
        SamplingParams().validate(prompt_len=prompt_len, max_context=64)
    assert field_of(e) == "prompt"


def test_empty_prompt_is_rejected():
    with pytest.raises(InvalidArgument) as e:
        SamplingParams().validate(prompt_len=0, max_context=64)
    assert field_of(e) == "prompt"


def test_explicit_max_tokens_beyond_the_context_is_an_error():
    params = SamplingParams.from_request(max_tokens=20)
    with pytest.raises(InvalidArgument, match="max_tokens beyond the context") as e:
        params.validate(prompt_len=50, max_context=64)
    assert field_of(e) == "max_tokens"


def test_explicit_max_tokens_that_fits_exactly_is_kept():
    params = SamplingParams.from_request(max_tokens=14)
    assert params.validate(prompt_len=50, max_context=64).max_tokens == 14


def test_default_max_tokens_is_capped_to_the_room_left():
    validated = SamplingParams.from_request().validate(prompt_len=50, max_context=64)
    assert validated.max_tokens == 14
    assert SamplingParams().validate(prompt_len=10, max_context=4096).max_tokens == DEFAULT_MAX_TOKENS


def test_until_context_full_takes_the_whole_room_unless_max_tokens_is_set():
    assert SamplingParams.from_request(until_context_full=True).validate(prompt_len=12, max_context=512).max_tokens == 500
    explicit = SamplingParams.from_request(max_tokens=600, until_context_full=True)
    with pytest.raises(InvalidArgument, match="beyond the context"):
        explicit.validate(prompt_len=12, max_context=512)


def test_validate_returns_a_copy_and_params_are_frozen():
    params = SamplingParams()
    validated = params.validate(prompt_len=60, max_context=64)
    assert params.max_tokens == DEFAULT_MAX_TOKENS and validated.max_tokens == 4
    with pytest.raises(AttributeError):
        params.max_tokens = 3  # type: ignore[misc]
