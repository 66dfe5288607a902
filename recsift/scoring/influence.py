"""DEALRec's influence score, computed for a whole batch at once.

Lin et al., "Data-efficient Fine-tuning for LLM-based Recommendation" (SIGIR 2024), after Koh & Liang
(2017): the influence of a training sample on the empirical risk is ⟨∇ℓ_i, H⁻¹ v⟩, where v is the mean
loss gradient over a reference set and H the Hessian of the training loss, both restricted to one
parameter block of the surrogate (by default, as in the authors' code, the output projection of its last
attention layer). H⁻¹v comes from LiSSA (Agarwal et al., 2017)::

    h ← v + (1 − damping) · h − H·h / scale        (H·h on a fresh mini-batch each step)
    H⁻¹v ≈ h / scale                               (averaged over ``repeats`` runs)

which converges to (H + damping·scale·I)⁻¹ v. Because H⁻¹v is one fixed vector per estimate, every
sample's score ⟨∇ℓ_i, H⁻¹v⟩ is the directional derivative of ℓ_i along it: one forward-mode pass
(``torch.func.jvp``) of the per-sample loss vector gives the scores of a whole batch, with no per-sample
gradient loop.

Departures from the authors' code: LiSSA steps use mini-batches (fewer steps, the same fixed point, less
variance) instead of single samples; estimates are versioned so that scores say which H⁻¹v they used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp

Inputs = tuple[Tensor, ...]


class InfluenceError(RuntimeError):
    """The estimate is unusable (non-finite: LiSSA diverged — raise ``scale``)."""


class InfluenceEstimator:
    """Influence scores for any module whose ``forward(*inputs)`` returns per-sample losses ``[B]``.

    ``block`` names the parameters the influence is restricted to; all others are held fixed.
    """

    def __init__(self, model: nn.Module, block: Sequence[str], damping: float = 0.01, scale: float = 25.0,
                 depth: int = 500, repeats: int = 1, seed: int = 0) -> None:
        params = dict(model.named_parameters())
        missing = [b for b in block if b not in params]
        if missing:
            raise ValueError(f"parameter block {missing} not in the model (has e.g. {list(params)[:4]})")
        if not block:
            raise ValueError("the parameter block is empty")
        self.model = model
        self.block = list(block)
        self.damping, self.scale, self.depth, self.repeats = damping, scale, depth, repeats
        self.generator = torch.Generator().manual_seed(seed)
        self.ihvp: Tensor | None = None
        self.version = 0

    # ------------------------------------------------------------------ functional view of the model

    def _parts(self) -> tuple[dict[str, Tensor], Tensor, list[tuple[str, torch.Size, int]]]:
        fixed = {k: v.detach() for k, v in self.model.named_parameters() if k not in self.block}
        fixed.update({k: v for k, v in self.model.named_buffers()})
        named = dict(self.model.named_parameters())
        layout = [(k, named[k].shape, named[k].numel()) for k in self.block]
        theta = torch.cat([named[k].detach().reshape(-1) for k in self.block])
        return fixed, theta, layout

    def _losses_fn(self) -> tuple[Callable[..., Tensor], Tensor]:
        fixed, theta, layout = self._parts()

        def losses(flat: Tensor, *inputs: Tensor) -> Tensor:
            params = dict(fixed)
            offset = 0
            for name, shape, numel in layout:
                params[name] = flat[offset:offset + numel].view(shape)
                offset += numel
            return functional_call(self.model, params, inputs)

        return losses, theta

    @property
    def block_size(self) -> int:
        return sum(p.numel() for k, p in self.model.named_parameters() if k in self.block)

    # ------------------------------------------------------------------ estimation

    def gradient(self, inputs: Inputs) -> Tensor:
        """Mean loss gradient over ``inputs`` w.r.t. the block (the v of a reference set)."""
        losses, theta = self._losses_fn()
        self.model.eval()
        return grad(lambda f: losses(f, *inputs).mean())(theta)

    def hvp(self, vector: Tensor, inputs: Inputs) -> Tensor:
        """Hessian of the mean loss over ``inputs`` times ``vector`` (forward-over-reverse)."""
        losses, theta = self._losses_fn()
        self.model.eval()
        g = grad(lambda f: losses(f, *inputs).mean())
        return jvp(g, (theta,), (vector,))[1]

    def estimate(self, reference: Inputs, sample: Callable[[torch.Generator], Inputs],
                 progress: Callable[[int, int], None] | None = None, start: Tensor | None = None,
                 depth: int | None = None) -> Tensor:
        """H⁻¹v by LiSSA, v from ``reference``; ``sample(generator)`` gives one training mini-batch per step.

        ``start``: an earlier H⁻¹v to begin the recursion from (``h₀ = scale·start`` instead of ``v``), with
        ``depth`` steps instead of the configured depth. The recursion contracts towards the same fixed point
        from any start, so when the model and v moved little since ``start`` a few steps reach what a cold
        start reaches in many."""
        v = self.gradient(reference)
        if start is not None and start.shape != v.shape:
            raise ValueError(f"start must have {v.numel()} entries, got {tuple(start.shape)}")
        steps = self.depth if depth is None else depth
        if steps < 1:
            raise ValueError(f"LiSSA needs at least one step, got depth {steps}")
        losses, theta = self._losses_fn()
        self.model.eval()
        g = grad(lambda f, *inp: losses(f, *inp).mean())
        total = torch.zeros_like(v)
        for r in range(self.repeats):
            h = v.clone() if start is None else start * self.scale
            for step in range(steps):
                batch = sample(self.generator)
                hv = jvp(lambda f, batch=batch: g(f, *batch), (theta,), (h,))[1]
                h = v + (1.0 - self.damping) * h - hv / self.scale
                if progress is not None and step % 50 == 0:
                    progress(r * steps + step, self.repeats * steps)
            total += h / self.scale
        ihvp = total / self.repeats
        if not torch.isfinite(ihvp).all():
            raise InfluenceError(f"LiSSA diverged (non-finite H⁻¹v); raise scale (now {self.scale})")
        self.ihvp = ihvp
        self.version += 1
        return ihvp

    def set_ihvp(self, ihvp: Tensor) -> None:
        """Use a known H⁻¹v (tests, restored checkpoints)."""
        if ihvp.shape != (self.block_size,):
            raise ValueError(f"H⁻¹v must have {self.block_size} entries, got {tuple(ihvp.shape)}")
        self.ihvp = ihvp
        self.version += 1

    # ------------------------------------------------------------------ scoring

    def scores(self, inputs: Inputs) -> Tensor:
        """⟨∇ℓ_i, H⁻¹v⟩ for every sample of the batch, from ONE forward-mode pass."""
        if self.ihvp is None:
            raise InfluenceError("no H⁻¹v estimate yet: call estimate() first")
        if inputs[0].shape[0] == 0:
            raise ValueError("empty batch: nothing to score")
        losses, theta = self._losses_fn()
        self.model.eval()
        out = jvp(lambda f: losses(f, *inputs), (theta,), (self.ihvp,))
        value, tangent = out[0], out[1]
        if not torch.isfinite(value).all():
            raise InfluenceError("non-finite per-sample loss in the batch; refusing to score it")
        return tangent.detach()

    def scores_by_loop(self, inputs: Inputs) -> Tensor:
        """The authors' way, one ``autograd.grad`` per sample: the reference the JVP path is checked against."""
        if self.ihvp is None:
            raise InfluenceError("no H⁻¹v estimate yet: call estimate() first")
        losses, theta = self._losses_fn()
        self.model.eval()
        out = []
        for i in range(inputs[0].shape[0]):
            one = tuple(x[i:i + 1] for x in inputs)
            flat = theta.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(losses(flat, *one).sum(), flat)
            out.append(torch.dot(g, self.ihvp))
        return torch.stack(out)


def default_block(model: nn.Module) -> list[str]:
    """The output projection of the last attention layer (DEALRec's choice), if the model has one."""
    names = [k for k, _ in model.named_parameters() if ".out_proj." in k]
    if not names:
        raise ValueError("the model has no attention output projection; name the parameter block explicitly")
    last = max(int(k.split(".")[1]) for k in names)
    return [k for k in names if int(k.split(".")[1]) == last]


def cosine(a: Tensor, b: Tensor) -> float:
    return float(torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-30))


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation (no ties expected for continuous scores)."""
    ra = torch.argsort(torch.argsort(a)).double()
    rb = torch.argsort(torch.argsort(b)).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / math.sqrt(float((ra * ra).sum() * (rb * rb).sum())))
