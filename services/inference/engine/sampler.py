"""Turn the last-position logits of each sequence into its next token (and logprobs)."""

from __future__ import annotations

import dataclasses
import secrets

import torch

from services.inference.engine.host_lists import to_device_async
from services.inference.engine.logits_processors import TokenHistory, process_logits
from services.inference.engine.sampling_params import SamplingParams
from services.inference.engine.structured import JsonGrammar, mask_disallowed

_SEED_MODULUS = 2**64  # torch.Generator takes a 64-bit seed; proto seeds are uint64


@dataclasses.dataclass
class SampledToken:
    token_id: int
    logprob: float | None  # log p(token) under the raw logits; None unless requested
    top: list[tuple[int, float]]  # (token id, logprob), best first; empty unless top_logprobs


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A private RNG for one request: seeded for reproducibility, else from the OS."""
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63) if seed is None else seed % _SEED_MODULUS)
    return generator


class Sampler:
    """Penalties, logit bias, the structured-output mask, then greedy, temperature, top-k and
    top-p (nucleus) sampling, one set of params per row.

    Semantics, for one row with raw logits l[V], prompt tokens P and generated tokens G so far
    (c[t] = how often t occurs in G), applied in this order:
      1. repetition_penalty r > 0 (HF transformers / vLLM; 1 = off):
           for t in set(P + G): l[t] = l[t] / r if l[t] > 0 else l[t] * r
      2. frequency_penalty f, presence_penalty p in [-2, 2] (OpenAI / vLLM; 0 = off; G only):
           l[t] -= f * c[t] + p * (c[t] > 0)
      3. logit_bias b (token id -> [-100, 100], at most 300 ids, each < V):  l[t] += b[t]
      4. structured output, a row's grammar A = the tokens that may come next (structured.py):
           for t not in A: l[t] = -inf
      5. greedy (temperature < 1e-5): argmax(l), the lowest id among ties; else
         softmax(l / temperature) after top-k, then top-p masking, drawn from.
    A row without options 1-4 is left as it is, and a batch where no row has any skips that
    work entirely (no [N, V] copy, no mask computed). Step 4 after 1-3: a bias cannot bring
    back a token the grammar forbids, and top-k/top-p choose among allowed tokens only.

    Each row draws from its own torch.Generator, so a seeded request yields the same tokens
    whatever else shares its batch. Logprobs are log_softmax of the RAW logits, before steps
    1-5: they report what the model believes, not the distorted distribution we happened to
    draw from (vLLM's default `raw_logprobs` too), so they are comparable across requests with
    different sampling settings. A token banned by a -100 bias or by the grammar still shows
    its raw logprob (and may appear among top_logprobs).
    """

    def __init__(self) -> None:
        self._unseeded: dict[torch.device, torch.Generator] = {}  # per device, for rows without their own

    def _unseeded_on(self, device: torch.device) -> torch.Generator:
        if device not in self._unseeded:
            self._unseeded[device] = make_generator(None, device)
        return self._unseeded[device]

    def sample(self, logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
               histories: list[TokenHistory] | None = None,
               grammars: list[JsonGrammar | None] | None = None) -> list[SampledToken]:
        """histories: each row's tokens so far (the engine's Sequences); needed by penalties only.
        grammars: each row's structured-output grammar, None for free text (None: no row has one)."""
        return self.sample_on_device(logits, params, generators, histories, grammars).to_host()

    def sample_on_device(self, logits: torch.Tensor, params: list[SamplingParams],
                         generators: list[torch.Generator | None], histories: list[TokenHistory] | None = None,
                         grammars: list[JsonGrammar | None] | None = None) -> DeviceSample:
        """sample() without reading the result: the work is queued on the logits' device and
        its copy to the host started, so the caller can queue the next step before waiting
        (nothing on the way reads from the device)."""
        # logits: [N, V], one row per sequence that completes its prefill this step
        if logits.dim() != 2 or logits.shape[0] != len(params) or len(params) != len(generators):
            raise ValueError(f"logits {tuple(logits.shape)} vs {len(params)} params, {len(generators)} generators")
        for name, per_row in (("histories", histories), ("grammars", grammars)):
            if per_row is not None and len(per_row) != len(params):
                raise ValueError(f"{len(per_row)} {name} vs {len(params)} params")
        logits = logits.float()
        processed = process_logits(logits, params, histories)  # [N, V]; `logits` itself when no row asks
        if grammars is not None and any(grammar is not None for grammar in grammars):
            if processed is logits:  # the raw logits stay intact: logprobs are computed from them
                processed = logits.clone()
            mask_disallowed(processed, grammars)
        token_ids = processed.argmax(dim=-1)  # [N]; the answer for greedy rows
        sampled_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if sampled_rows:
            rows = to_device_async(sampled_rows, torch.int64, logits.device)
            probs = self._filtered_probs(processed[rows], [params[i] for i in sampled_rows])  # [S, V]
            for row_probs, i in zip(probs, sampled_rows):
                generator = generators[i] or self._unseeded_on(row_probs.device)
                if generator.device != row_probs.device:  # a generator made elsewhere: correct, but slow on GPU
                    row_probs = row_probs.to(generator.device)
                # argmax(p / E) with E ~ Exp(1) draws from p (the exponential race), and unlike
                # torch.multinomial it never reads back to the host: on a GPU a sync per row
                # would cost more than the step.
                race = torch.empty_like(row_probs).exponential_(generator=generator)
                race.clamp_min_(torch.finfo(race.dtype).tiny)  # a 0 draw would make 0/0 = NaN win the argmax
                token_ids[i] = (row_probs / race).argmax().to(token_ids.device)
        return self._with_logprobs(logits, token_ids, params)

    @staticmethod
    def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Softmax of logits/temperature after top-k then top-p masking. [S, V] -> [S, V]"""
        device = logits.device
        vocab = logits.shape[-1]
        temperature = to_device_async([p.temperature for p in params], torch.float32, device)  # [S]
        logits = logits / temperature[:, None]
        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        # top_p = 1 keeps everything; skip it so float rounding in the cumsum cannot drop tail tokens.
        top_p = [p.top_p if p.top_p < 1.0 else 2.0 for p in params]
        if min(top_k) == vocab and min(top_p) > 1.0:
            return torch.softmax(logits, dim=-1)
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [S, V] each
        rank = torch.arange(vocab, device=device)[None, :]  # [1, V]
        sorted_logits = sorted_logits.masked_fill(rank >= to_device_async(top_k, torch.int64, device)[:, None],
                                                  float("-inf"))
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [S, V]
        # Keep the smallest prefix whose mass reaches top_p; rank 0 always survives (mass_before 0).
        drop = mass_before >= to_device_async(top_p, torch.float32, device)[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        filtered = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        return torch.softmax(filtered, dim=-1)

    @staticmethod
    def _with_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, params: list[SamplingParams]) -> DeviceSample:
        if not any(p.wants_logprobs for p in params):
            return DeviceSample(params, token_ids)
        logprobs = torch.log_softmax(logits, dim=-1)  # [N, V], raw logits: see the class docstring
        chosen = logprobs.gather(-1, token_ids[:, None]).squeeze(-1)  # [N]
        max_top = max(p.top_logprobs for p in params)
        top_values = top_ids = None
        if max_top:  # ranked for the rows that ask only: the ranking keeps ~20 bytes per logit
            asking = [i for i, p in enumerate(params) if p.top_logprobs]
            if len(asking) == len(params):
                top_values, top_ids = _top_logprobs(logprobs, max_top)  # [N, K]
            else:
                rows = to_device_async(asking, torch.int64, logprobs.device)
                values, ids = _top_logprobs(logprobs[rows], max_top)  # [A, K]
                top_values = values.new_zeros(len(params), values.shape[1]).index_copy_(0, rows, values)
                top_ids = ids.new_zeros(len(params), ids.shape[1]).index_copy_(0, rows, ids)
        return DeviceSample(params, token_ids, chosen, top_values, top_ids)


class DeviceSample:
    """One step's sampled tokens (and logprobs) on the device, on their way to the host: the
    copy is queued behind the sampling, so waiting for it waits for nothing queued later."""

    def __init__(self, params: list[SamplingParams], token_ids: torch.Tensor, chosen: torch.Tensor | None = None,
                 top_values: torch.Tensor | None = None, top_ids: torch.Tensor | None = None) -> None:
        self.params = params
        self.token_ids = token_ids  # [N] int64 on the device: the next step's input, overlapped
        on_device = [token_ids, chosen, top_values, top_ids]
        self._copied = torch.cuda.Event() if token_ids.is_cuda else None
        # .tolist() on a CUDA tensor waits for the whole stream, the next step's forward too
        self._host = [None if t is None else t.to("cpu", non_blocking=True) if t.is_cuda else t for t in on_device]
        if self._copied is not None:
            self._copied.record()

    def select(self, rows: list[int]) -> torch.Tensor:
        """The sampled ids of these rows, on the device: an overlapped step's input ids."""
        if rows == list(range(self.token_ids.shape[0])):
            return self.token_ids
        return self.token_ids.index_select(0, to_device_async(rows, torch.int64, self.token_ids.device))

    def to_host(self) -> list[SampledToken]:
        if self._copied is not None:
            self._copied.synchronize()
        token_ids, chosen, top_values, top_ids = self._host
        ids = token_ids.tolist()
        if chosen is None:
            return [SampledToken(token_id=t, logprob=None, top=[]) for t in ids]
        chosen = chosen.tolist()
        results = []
        for i, p in enumerate(self.params):
            top: list[tuple[int, float]] = []
            if p.top_logprobs:
                top = list(zip(top_ids[i, :p.top_logprobs].tolist(), top_values[i, :p.top_logprobs].tolist()))
            results.append(SampledToken(token_id=ids[i], logprob=chosen[i] if p.wants_logprobs else None, top=top))
        return results


def _top_logprobs(logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of each row [N, V] -> values, ids [N, k], best first, equal logprobs in
    token-id order: the order argmax breaks ties in, so a greedy token tied for best (bf16
    logits tie often) is listed first. torch.topk orders ties arbitrarily and may keep any of
    those tied at its last place, so it ranks one int64 key per token instead: the logprob's
    bits mapped to an int32 of the same order, above V - 1 - id. Unlike finding the tied rows
    and re-sorting them (nonzero() reads a count back), this never waits for the device: with
    decode steps overlapped, a wait here would hold the host until the next step's forward ends."""
    bits = (logprobs + 0.0).view(torch.int32)  # [N, V], a copy; + 0.0: -0.0 becomes 0.0, which it equals
    # Negative floats order backwards as int32 bits; flipping all but the sign bit fixes that
    # (bits >> 31 is all ones for them, zero otherwise). In place: these are [N, V] each.
    bits ^= (bits >> 31) & 0x7FFFFFFF
    keys = bits.to(torch.int64)  # [N, V]
    del bits
    vocab = logprobs.shape[-1]
    keys <<= 32
    keys |= vocab - 1 - torch.arange(vocab, device=logprobs.device)  # [V], in [0, V): below 2**32
    _, ids = keys.topk(min(k, vocab), dim=-1)  # [N, k], best first
    return logprobs.gather(-1, ids), ids
