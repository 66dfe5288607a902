"""DEALRec's influence score (Lin et al., SIGIR 2024, §3.2) on a surrogate: score_i = ⟨∇loss_i, H⁻¹v⟩,
v the mean loss gradient of a reference set over the surrogate's influence block, H⁻¹v by LiSSA (see
``influence.py``). The effort term joins in :func:`recsift.scoring.scorer.combine`.

Every re-estimate starts LiSSA from v. Starting it from the previous H⁻¹v instead was measured on the stream
and is worse than a cold start of as many steps (``bench/lissa.py``): the stale estimate's components
along low-curvature directions decay by only (1 − damping) a step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from recsift.registry import ComponentConfig
from recsift.scoring.influence import InfluenceEstimator
from recsift.scoring.scorer import Scores, Versioned, by_length, check_batch
from recsift.scoring.surrogate import SeqBatch, Surrogate
from recsift.state import State


class DEALRecConfig(ComponentConfig):
    """LiSSA settings of the H⁻¹v estimate (DEALRec: damping 0.01, scale 25; the authors run 5,000
    single-sample steps, recsift 100 mini-batches of ``batch_size``: on the stream's re-estimates, 500 steps
    rank the scores as 100 do, Spearman ≥ 0.9994 on two streams, ``bench/lissa.py``)."""

    type: Literal["dealrec"] = "dealrec"
    damping: float = Field(0.01, ge=0.0, lt=1.0)
    scale: float = Field(25.0, gt=0.0)
    depth: int = Field(100, gt=0, description="LiSSA mini-batch steps (bench/lissa.py: 100 agree with 500 to a "
                                            "score Spearman of 0.9994 on the synthetic stream and on Games)")
    batch_size: int = Field(64, gt=0, description="reference rows per Hessian-vector product")
    repeats: int = Field(1, gt=0, description="independent LiSSA runs averaged")
    block: tuple[str, ...] | None = Field(None, description="parameter names; unset: the surrogate's own block")


class DEALRecScorer(Versioned):
    """DEALRec's influence on the surrogate: score_i = ⟨∇loss_i, H⁻¹v⟩ (see ``influence.py``)."""

    Config: ClassVar[type[ComponentConfig]] = DEALRecConfig

    def __init__(self, seed: int = 0, damping: float = 0.01, scale: float = 25.0, depth: int = 100,
                 batch_size: int = 64, repeats: int = 1, block: Sequence[str] | None = None) -> None:
        self.seed = seed
        self.damping, self.scale, self.depth, self.batch_size, self.repeats = damping, scale, depth, batch_size, repeats
        self.block = list(block) if block else None
        self.estimator: InfluenceEstimator | None = None
        self._restored_ihvp: Tensor | None = None  # from load_state_dict; the estimator is rebuilt at scoring
        self.version = 0

    def prepare(self, surrogate: Surrogate, reference: SeqBatch) -> None:
        """Re-estimate H⁻¹v: v from ``reference``, Hessian mini-batches sampled from it too."""
        check_batch(reference)
        self.estimator = self._estimator(surrogate)
        size = min(self.batch_size, len(reference))

        def sample(g: torch.Generator) -> tuple[Tensor, ...]:
            return surrogate.loss_inputs(reference.select(torch.randint(0, len(reference), (size,), generator=g)))

        self.estimator.estimate(surrogate.loss_inputs(reference), sample)
        self.version += 1

    def state_dict(self) -> State:
        state = super().state_dict()
        ihvp = self.estimator.ihvp if self.estimator is not None else self._restored_ihvp
        if ihvp is not None:
            state.tensors["ihvp"] = ihvp
        return state

    def load_state_dict(self, state: State) -> None:
        super().load_state_dict(state)
        self.estimator, self._restored_ihvp = None, state.tensors.get("ihvp")

    def _estimator(self, surrogate: Surrogate) -> InfluenceEstimator:
        return InfluenceEstimator(surrogate.loss_model, self.block or surrogate.influence_block(), self.damping,
                                  self.scale, self.depth, self.repeats, self.seed)

    def influence(self, surrogate: Surrogate, batch: SeqBatch) -> Tensor:
        if self.estimator is None and self._restored_ihvp is not None:
            self.estimator = self._estimator(surrogate)
            self.estimator.set_ihvp(self._restored_ihvp)
            self._restored_ihvp = None
        estimator = self.estimator
        if estimator is None:
            raise RuntimeError("call prepare() before scoring")
        return by_length(lambda rows: estimator.scores(surrogate.loss_inputs(rows)), batch)

    def score(self, surrogate: Surrogate, batch: SeqBatch) -> Scores:
        """Raw influence (the effort term joins in :func:`combine`)."""
        return Scores(self.influence(surrogate, batch), self.version)
