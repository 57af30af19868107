"""LLMEngine: the step — schedule -> run -> sample -> postprocess -> text.

It runs on one thread (the engine thread of AsyncEngine); nothing here is thread-safe.
Each step returns one RequestOutput per sequence that produced something. With `overlap`,
a decode step may queue the next one on the device before reading its own tokens
(overlap.py); that step is then in flight between calls, and the next call finishes it.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import torch

from services.inference.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from services.inference.engine.model_runner import ModelRunner
from services.inference.engine.overlap import schedule_ahead
from services.inference.engine.sampler import DeviceSample, SampledToken, Sampler, make_generator
from services.inference.engine.sampling_params import SamplingParams
from services.inference.engine.scheduler import ScheduledBatch, Scheduler
from services.inference.engine.sequence import FinishReason, Sequence
from services.inference.engine.structured import JsonGrammar


@dataclasses.dataclass
class RequestOutput:
    seq_id: int
    text: str  # new text since the previous output (whole characters)
    token_ids: list[int]  # new token ids
    logprobs: list[SampledToken]
    finish_reason: FinishReason | None = None
    matched_stop: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


@dataclasses.dataclass
class _Request:
    seq: Sequence
    detokenizer: IncrementalDetokenizer
    stops: StopStringMatcher
    generator: torch.Generator | None


@dataclasses.dataclass
class _Launched:
    """A step queued on the device: its batch, the sequences that get a token (in the order of
    the sampled rows) and the tokens on their way back."""

    batch: ScheduledBatch
    seqs: list[Sequence]
    sample: DeviceSample | None  # None when no sequence completes its prefill
    advanced: bool = False  # its KV accounting done already (the step after it was scheduled)


class LLMEngine:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, tokenizer: Any, block_size: int,
                 overlap: bool = False) -> None:
        """overlap: queue each decode step before reading the last one's tokens when it can
        (overlap.py); worth it where the device runs asynchronously (CUDA graphs)."""
        self.runner, self.scheduler, self.tokenizer = runner, scheduler, tokenizer
        self.block_size = block_size
        self.overlap = overlap
        self.overlapped_steps = 0  # steps queued before the previous one's tokens were read
        self._in_flight: _Launched | None = None
        self.sampler = Sampler()
        self._requests: dict[int, _Request] = {}
        self._ids = itertools.count()
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.finished_requests = 0
        self.idle = False

    def add(self, prompt_token_ids: list[int], sampling: SamplingParams, adapter_key: str | None = None,
            request_id: str = "", seq_id: int | None = None, adapter_sha256: str = "", cache_scope: str = "",
            grammar: JsonGrammar | None = None) -> int:
        """Queues a request (ResourceExhausted when the queue is full); returns its seq id.
        cache_scope: it shares cached prompt KV only with requests of the same scope.
        grammar: the compiled structured output its tokens must follow (None = free text)."""
        seq_id = next(self._ids) if seq_id is None else seq_id
        seq = Sequence(seq_id, prompt_token_ids, sampling, adapter_key, self.block_size, request_id, adapter_sha256,
                       cache_scope, grammar)
        self.scheduler.add(seq)
        # On the logits' device, so sampling never copies a row of probabilities to the host.
        generator = None if sampling.is_greedy else make_generator(sampling.seed, self.runner.device)
        kept = {token_id: self.tokenizer.convert_ids_to_tokens(token_id) for token_id in sampling.kept_special_ids}
        self._requests[seq.seq_id] = _Request(seq, IncrementalDetokenizer(self.tokenizer, prompt_token_ids, kept=kept),
                                              StopStringMatcher(sampling.stop), generator)
        self.prompt_tokens += len(prompt_token_ids)
        return seq.seq_id

    def abort(self, seq_id: int) -> None:
        self.scheduler.abort(seq_id)
        self._requests.pop(seq_id, None)

    @property
    def has_step_in_flight(self) -> bool:
        """A step is queued whose tokens the next step() reads (overlap)."""
        return self._in_flight is not None

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_unfinished or self._in_flight is not None

    def step(self) -> list[RequestOutput]:
        current, self._in_flight = self._in_flight, None
        self.idle = False
        if current is None:
            batch = self.scheduler.schedule()
            self.idle = batch.is_empty  # work exists but none can run (e.g. adapters still loading)
            if batch.is_empty:
                return []
            current = self._launch(batch)
        if self.overlap and current.sample is not None:
            ahead = schedule_ahead(self.scheduler, current.batch, current.seqs)
            if ahead is not None:
                current.advanced = True
                self._in_flight = self._launch(ahead.batch, current.sample.select(ahead.rows))
                self.overlapped_steps += 1
        return self._finish(current)

    def _launch(self, batch: ScheduledBatch, input_ids: torch.Tensor | None = None) -> _Launched:
        """Queues the step's forward and sampling; reads nothing back."""
        seqs, logits = self.runner.run(batch, input_ids)
        if not seqs:
            return _Launched(batch, seqs, None)
        generators = [self._requests[seq.seq_id].generator if seq.seq_id in self._requests else None
                      for seq in seqs]
        return _Launched(batch, seqs, self.sampler.sample_on_device(
            logits, [s.sampling for s in seqs], generators, seqs, [s.grammar for s in seqs]))

    def _finish(self, step: _Launched) -> list[RequestOutput]:
        """Reads the step's tokens and turns them into outputs. A sequence that ended after the
        step was queued (aborted, or stopped by the step before) gets nothing from it."""
        tokens = step.sample.to_host() if step.sample is not None else []
        live = [(self._requests[seq.seq_id], token) for seq, token in zip(step.seqs, tokens)
                if not seq.is_finished and seq.seq_id in self._requests]
        sampled = {request.seq.seq_id: token.token_id for request, token in live}
        if step.advanced:
            self.scheduler.accept(step.batch, sampled)
        else:
            self.scheduler.postprocess(step.batch, sampled)
        return [self._output(request, token) for request, token in live]

    def _output(self, request: _Request, token: SampledToken) -> RequestOutput:
        seq = request.seq
        self.generated_tokens += 1
        text, matched = request.stops.feed(request.detokenizer.push([token.token_id]))
        if matched is None and seq.is_finished:  # EOS or length: release the held-back tail
            tail, matched = request.stops.feed(request.detokenizer.flush())
            text += tail if matched is not None else tail + request.stops.flush()
        if matched is not None:
            self.scheduler.finish(seq, FinishReason.STOP)  # no-op when already finished
        finish_reason = FinishReason.STOP if matched is not None else seq.finish_reason
        output = RequestOutput(seq.seq_id, text, [token.token_id],
                               [token] if seq.sampling.wants_logprobs else [],
                               finish_reason if seq.is_finished else None, matched,
                               seq.num_prompt_tokens, seq.num_completion_tokens, seq.num_cached_prompt_tokens)
        if seq.is_finished:
            self._requests.pop(seq.seq_id, None)
            self.finished_requests += 1
        return output
