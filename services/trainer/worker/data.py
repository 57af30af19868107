"""Training data inside the worker: encode, split, order and collate.

Determinism: the held-out split is a seeded permutation of the dataset; each epoch's order is
a permutation seeded by (seed, epoch). The examples of optimizer step `s` are therefore a pure
function of (seed, s), which is what lets a resumed job continue with exactly the batches an
uninterrupted one would have seen.
"""

from __future__ import annotations

from pathlib import Path

import torch

from services.trainer.examples import IGNORE_INDEX, Encoded, encode
from services.trainer.validation import read_examples

_MIX = 1_000_003


def load_encoded(dataset_path: Path, fmt: str, tokenizer) -> list[Encoded]:
    return [encode(tokenizer, fmt, example) for example in read_examples(dataset_path, fmt)]


def _generator(seed: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * _MIX + salt) % 2**63)


def split(examples: list[Encoded], num_eval: int, seed: int) -> tuple[list[Encoded], list[Encoded]]:
    """(train, eval): `num_eval` examples held out by a seeded draw; both keep file order."""
    if num_eval == 0:
        return list(examples), []
    held_out = set(torch.randperm(len(examples), generator=_generator(seed, 0))[:num_eval].tolist())
    train = [example for i, example in enumerate(examples) if i not in held_out]
    return train, [example for i, example in enumerate(examples) if i in held_out]


class StepPlan:
    """Which training examples each optimizer step uses."""

    def __init__(self, num_train: int, batch_size: int, accumulation: int, steps_per_epoch: int, seed: int) -> None:
        self.num_train, self.batch_size, self.accumulation = num_train, batch_size, accumulation
        self.steps_per_epoch, self.seed = steps_per_epoch, seed
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            self._orders = {epoch: torch.randperm(self.num_train, generator=_generator(self.seed, epoch + 1)).tolist()}
        return self._orders[epoch]

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch

    def micro_batches(self, step: int) -> list[list[int]]:
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self._order(epoch)
        start = within * self.accumulation * self.batch_size
        groups = []
        for k in range(self.accumulation):
            low = start + k * self.batch_size
            if low >= self.num_train:
                break
            groups.append(order[low:low + self.batch_size])
        return groups


def collate(batch: list[Encoded], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids, attention_mask and labels (IGNORE_INDEX on padding)."""
    width = max(len(example.input_ids) for example in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # [batch, width]
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)  # [batch, width]
    mask = torch.zeros((len(batch), width), dtype=torch.long)  # [batch, width]
    for row, example in enumerate(batch):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
