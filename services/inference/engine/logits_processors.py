"""Penalties and logit bias: a batch's raw logits -> the logits each row samples from.

The semantics, and their order, are in the Sampler's docstring. Only rows that ask pay: a batch
where no row has a penalty or a bias gets its logits back untouched, without an [N, V] copy.
Token histories are host lists; they go to the logits' device as one flat index tensor per
option, so no step reads anything back from the device (one scatter per option, not per row).
The histories are re-read every step: host work grows with the penalized rows' lengths (a
32k-token prompt under repetition_penalty is one 32k-int tensor per step). Counts kept per
sequence and updated by one token a step would remove that; it is not worth the state (freed
on finish, rebuilt on preemption) until a measurement says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from services.inference.engine.sampling_params import SamplingParams


class TokenHistory(Protocol):
    """What the penalties read of a request (engine Sequences are ones)."""

    token_ids: list[int]  # the prompt, then the tokens generated so far
    num_prompt_tokens: int


def process_logits(logits: torch.Tensor, params: Sequence[SamplingParams],
                   histories: Sequence[TokenHistory] | None) -> torch.Tensor:
    """[N, V] raw logits -> [N, V] processed; `logits` itself when no row asks, else a copy
    (the raw logits stay intact: logprobs are computed from them)."""
    rows = [i for i, p in enumerate(params) if p.processes_logits]
    if not rows:
        return logits
    if histories is None and any(params[i].has_penalties for i in rows):
        raise ValueError("penalties need each row's token history")
    processed = logits.clone()
    vocab, device = logits.shape[-1], logits.device

    repeated = [i for i in rows if params[i].repetition_penalty != 1.0]
    if repeated:
        index = torch.tensor(repeated, device=device)
        seen = token_counts([histories[i].token_ids for i in repeated], vocab, device) > 0  # [R, V]
        penalty = torch.tensor([params[i].repetition_penalty for i in repeated], device=device)[:, None]  # [R, 1]
        chosen = processed[index]
        penalized = torch.where(chosen > 0, chosen / penalty, chosen * penalty)
        processed[index] = torch.where(seen, penalized, chosen)

    counted = [i for i in rows if params[i].frequency_penalty != 0.0 or params[i].presence_penalty != 0.0]
    if counted:
        index = torch.tensor(counted, device=device)
        generated = [histories[i].token_ids[histories[i].num_prompt_tokens:] for i in counted]
        counts = token_counts(generated, vocab, device)  # [C, V]
        frequency = torch.tensor([params[i].frequency_penalty for i in counted], device=device)[:, None]  # [C, 1]
        presence = torch.tensor([params[i].presence_penalty for i in counted], device=device)[:, None]  # [C, 1]
        processed[index] -= frequency * counts + presence * (counts > 0)

    biased = [i for i in rows if params[i].logit_bias]
    if biased:
        row_ids = [i for i in biased for _ in params[i].logit_bias]
        token_ids = [t for i in biased for t, _ in params[i].logit_bias]
        biases = [b for i in biased for _, b in params[i].logit_bias]
        # accumulate: the bias is added to the logit, not written over it.
        processed.index_put_((torch.tensor(row_ids, device=device), torch.tensor(token_ids, device=device)),
                             torch.tensor(biases, device=device, dtype=processed.dtype), accumulate=True)
    return processed


def token_counts(id_lists: Sequence[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """How often each token occurs in each list: [len(id_lists), vocab] float32 on `device`.

    One flat scatter_add over (row * vocab + id): no padding to the longest list, and no read
    back from the device."""
    lengths = torch.tensor([len(ids) for ids in id_lists])  # [R]
    flat = torch.cat([torch.tensor(ids, dtype=torch.int64) for ids in id_lists])  # [sum(lengths)]
    rows = torch.repeat_interleave(torch.arange(len(id_lists)), lengths)  # [sum(lengths)]
    linear = (rows * vocab + flat).to(device)
    counts = torch.zeros(len(id_lists) * vocab, device=device)
    counts.scatter_add_(0, linear, torch.ones(linear.shape, device=device))
    return counts.view(len(id_lists), vocab)
