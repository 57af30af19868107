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
    (dict(presence_penalty=2.01), "presence_penalty"),
    (dict(presence_penalty=math.nan), "presence_penalty"),
    (dict(frequency_penalty=-2.5), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(repetition_penalty=math.inf), "repetition_penalty"),
    (dict(logit_bias=((5, 100.5),)), "logit_bias"),
    (dict(logit_bias=((5, math.nan),)), "logit_bias"),
    (dict(logit_bias=((-1, 1.0),)), "logit_bias"),
    (dict(logit_bias=((64, 1.0),)), "logit_bias"),  # the vocabulary is [0, 64)
    (dict(logit_bias=tuple((i, 1.0) for i in range(301))), "logit_bias"),
])
def test_bad_parameters_raise_invalid_argument_naming_the_field(kwargs, field):
    with pytest.raises(InvalidArgument) as excinfo:
        SamplingParams(**kwargs).validate(prompt_len=4, max_context=64, vocab_size=64)
    assert field_of(excinfo) == field


def test_logit_processing_edge_values_are_accepted():
    params = SamplingParams(max_tokens=1, presence_penalty=-2.0, frequency_penalty=2.0, repetition_penalty=1e-3,
                            logit_bias=tuple((i, (-100.0, 100.0)[i % 2]) for i in range(300)))
    assert params.validate(prompt_len=4, max_context=64, vocab_size=300) == params
    assert params.processes_logits and params.has_penalties and not SamplingParams().processes_logits


def test_a_logit_bias_id_beyond_the_vocabulary_is_named():
    with pytest.raises(InvalidArgument, match="logit_bias token id 9 is not in the vocabulary") as e:
        SamplingParams(logit_bias=((9, 1.0),)).validate(prompt_len=4, max_context=64, vocab_size=9)
    assert field_of(e) == "logit_bias" and e.value.metadata["token_id"] == "9"


def test_from_request_reads_penalties_and_sorts_the_bias_map():
    params = SamplingParams.from_request(presence_penalty=0.5, frequency_penalty=-1, repetition_penalty=1.2,
                                         logit_bias={9: 1, 3: -2.5})
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.5, -1.0, 1.2)
    assert params.logit_bias == ((3, -2.5), (9, 1.0))
    unset = SamplingParams.from_request(presence_penalty=None, logit_bias={})
    assert unset == SamplingParams() and not unset.processes_logits


def test_a_huge_logit_bias_map_is_refused_before_it_is_copied():
    class Huge(dict):
        def items(self):
            raise AssertionError("copied")

    with pytest.raises(InvalidArgument) as e:
        SamplingParams.from_request(logit_bias=Huge({i: 1.0 for i in range(301)}))
    assert field_of(e) == "logit_bias"


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
