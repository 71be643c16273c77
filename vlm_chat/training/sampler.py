"""The training data order: a function of ``(seed, epoch)`` only, cut to whole optimizer steps (exact resume)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

__all__ = ["EpochSampler", "mix_seed", "samples_in_run"]


class EpochSampler(Sampler[int]):
    """Shuffled indices whose order depends only on ``(seed, epoch)``, cut to whole optimizer steps.

    Cutting each epoch to a multiple of the samples per optimizer step (``batch * accumulation *
    processes``) means every optimizer step sees exactly that many samples, so gradient accumulation and
    multi-process runs are equivalent to one large batch, and an epoch boundary never splits a step.
    The few samples left over differ from epoch to epoch (the permutation changes).

    With ``lengths`` (and ``group`` > 1), samples of similar length share a batch, as transformers'
    ``group_by_length``: the shuffled order is cut into windows of ``group`` optimizer steps, each window is
    sorted by length and cut into steps, and the steps are shuffled again. Padding (wasted compute) drops while
    the order still depends only on ``(seed, epoch)``, so resuming stays exact. (transformers'
    ``LengthGroupedSampler`` does not cut epochs to whole steps, which the exact-resume guarantee relies on.)

    Args:
        num_samples: dataset length.
        seed: data-order seed.
        multiple: epoch length is rounded down to a multiple of this.
        lengths: optional length (any monotone proxy, e.g. characters) of every sample.
        group: optimizer steps per length-sorting window.
    """

    def __init__(self, num_samples: int, seed: int, multiple: int = 1, lengths: Sequence[int] | None = None,
                 group: int = 32):
        if lengths is not None and len(lengths) != num_samples:
            raise ValueError(f"lengths has {len(lengths)} entries for {num_samples} samples")
        self.num_samples = num_samples
        self.seed = seed
        self.multiple = multiple
        self.lengths = lengths
        self.group = group
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (self.num_samples // self.multiple) * self.multiple

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, 0x5EED))
        order = torch.randperm(self.num_samples, generator=generator)[: len(self)].tolist()
        if self.lengths is None or self.group <= 1:
            yield from order
            return
        steps = []
        window = self.multiple * self.group
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: -self.lengths[i])
            steps += [chunk[i : i + self.multiple] for i in range(0, len(chunk), self.multiple)]
        for k in torch.randperm(len(steps), generator=generator).tolist():
            yield from steps[k]


def mix_seed(*parts: int) -> int:
    """Combine integers into one seed in [0, 2**32) (numpy's limit); stable across runs and platforms."""
    value = 0x9E3779B9
    for part in parts:
        value = (value * 1_000_003 + int(part)) % (2**61 - 1)
    return value % (2**32)


def samples_in_run(num_samples: int, seed: int, samples_per_step: int, max_steps: int,
                   lengths: Sequence[int] | None = None) -> list[int]:
    """Indices of every sample that ``max_steps`` optimizer steps of :class:`EpochSampler` order will draw.

    The order depends only on ``(seed, epoch)``, so the samples a run will see are known before it starts; the
    vision-feature pass uses this to run the tower only on the images of those samples.

    Args:
        num_samples: dataset length.
        seed: data-order seed.
        samples_per_step: samples per optimizer step, all processes together.
        max_steps: optimizer steps of the run.
        lengths: the ``group_by_length`` proxies, if the run groups by length.

    Returns:
        Sorted distinct indices.
    """
    steps_per_epoch = num_samples // samples_per_step
    if steps_per_epoch == 0:
        return list(range(num_samples))  # the engine refuses this run with a clear error
    sampler = EpochSampler(num_samples, seed, samples_per_step, lengths=lengths)
    seen: set[int] = set()
    done, epoch = 0, 0
    while done < max_steps and len(seen) < num_samples:
        sampler.set_epoch(epoch)
        take = min(steps_per_epoch, max_steps - done)
        seen.update(list(sampler)[: take * samples_per_step])
        done, epoch = done + take, epoch + 1
    return sorted(seen)
