"""The coreset baselines of the DEALRec paper (its Table 2), as registered scorers.

- ``random``: a uniform number from (seed, sample id): a selector built on it samples uniformly;
- ``loss``: the surrogate's per-sample loss;
- ``el2n``: the L2 norm of the error vector softmax(logits) − onehot(target) over the catalogue
  (Paul et al., 2021), for predicting the target from the history;
- ``grand``: the per-sample gradient norm over a parameter block (Paul et al., 2021), with
  ``torch.func.vmap(grad)``.

CCS (coverage-centric selection, Zheng et al., 2023) is a selection rule, not a score: it stratifies
EL2N or another difficulty score, so it lives with the selectors.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor
from torch.func import functional_call, grad, vmap

from recsift.registry import ComponentConfig
from recsift.scoring.scorer import FollowsSurrogate, Scores, Versioned, by_length, check_batch
from recsift.scoring.surrogate import PAD, SeqBatch, Surrogate, hashed_negatives


class RandomConfig(ComponentConfig):
    type: Literal["random"] = "random"


class LossConfig(ComponentConfig):
    type: Literal["loss"] = "loss"


class EL2NConfig(ComponentConfig):
    type: Literal["el2n"] = "el2n"


class GraNdConfig(ComponentConfig):
    type: Literal["grand"] = "grand"
    block: tuple[str, ...] | None = Field(None, description="parameter names; unset: the surrogate's own block")


class RandomScorer(Versioned):
    Config: ClassVar[type[ComponentConfig]] = RandomConfig

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.version = 1

    def prepare(self, surrogate: Surrogate, reference: SeqBatch) -> None:
        return None  # nothing depends on the surrogate

    def score(self, surrogate: Surrogate, batch: SeqBatch) -> Scores:
        check_batch(batch)
        draws = hashed_negatives(batch.sample_ids, 1, 2**31, self.seed)[:, 0]
        return Scores(draws.double() / 2**31, self.version)


class LossScorer(FollowsSurrogate):
    Config: ClassVar[type[ComponentConfig]] = LossConfig

    def score(self, surrogate: Surrogate, batch: SeqBatch) -> Scores:
        return Scores(by_length(surrogate.losses, batch), self.version)


class EL2NScorer(FollowsSurrogate):
    Config: ClassVar[type[ComponentConfig]] = EL2NConfig

    def score(self, surrogate: Surrogate, batch: SeqBatch) -> Scores:
        def el2n(rows: SeqBatch) -> Tensor:
            logits = surrogate.score_items(SeqBatch(rows.seqs[:, :-1], rows.sample_ids))  # next item after the history
            logits[:, PAD] = -torch.inf
            probs = torch.softmax(logits.double(), dim=1)
            probs[torch.arange(len(rows)), rows.seqs[:, -1]] -= 1.0
            return probs.norm(dim=1)

        return Scores(by_length(el2n, batch, 512), self.version)


class GraNdScorer(FollowsSurrogate):
    Config: ClassVar[type[ComponentConfig]] = GraNdConfig

    def __init__(self, seed: int = 0, block: Sequence[str] | None = None) -> None:
        super().__init__(seed)
        self.block = list(block) if block else None

    def score(self, surrogate: Surrogate, batch: SeqBatch) -> Scores:
        model = surrogate.loss_model
        model.eval()
        names = self.block or surrogate.influence_block()
        params = {k: v.detach() for k, v in model.named_parameters()}
        block = {k: params[k] for k in names}
        buffers = dict(model.named_buffers())

        def one(p: dict[str, Tensor], *inputs: Tensor) -> Tensor:
            return functional_call(model, {**params, **buffers, **p}, tuple(x[None] for x in inputs))[0]

        def norms(rows: SeqBatch) -> Tensor:
            inputs = surrogate.loss_inputs(rows)
            with warnings.catch_warnings():  # vmap over CPU attention falls back to a loop and says so: not actionable
                warnings.filterwarnings("ignore", message="There is a performance drop", category=UserWarning)
                grads = vmap(grad(one), in_dims=(None, *([0] * len(inputs))))(block, *inputs)
            return torch.stack([g.reshape(len(rows), -1).double().pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()

        return Scores(by_length(norms, batch, 512), self.version)
