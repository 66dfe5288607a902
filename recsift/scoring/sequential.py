"""What every trainable surrogate shares: the item vocabulary and its growing embedding table, the replay
buffer, seeded training steps, encoding, and a checkpoint of the whole state (safetensors + JSON).

A surrogate is one network plus four answers (see :class:`SequentialSurrogate`): how to build the network
for a table of ``rows``, what the deterministic per-sample loss reads (``loss_inputs``), what a training
step reads (``train_inputs``, drawn from the surrogate's own generator), and the representation after a
whole row (``represent``). SASRec, GRU4Rec and BERT4Rec are subclasses; the
:class:`~recsift.scoring.surrogate.Surrogate` protocol is what scorers see.

The network must expose its item table as ``item_emb`` (an ``nn.Embedding`` with padding row 0) and
return per-sample losses ``[B]`` from ``forward(*loss_inputs(batch))``, so that ``torch.func`` can take
influence over any of its parameter blocks.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import ClassVar, Protocol, cast

import torch
from torch import Tensor, nn

from recsift import batching
from recsift.batching import length_buckets
from recsift.scoring.sampling import TensorReservoir
from recsift.scoring.surrogate import (
    PAD,
    Encoded,
    ItemVocab,
    SeqBatch,
    encode_sequences,
    hashed_negatives,
    left_pad,
    trim_padding,
)
from recsift.state import State


class SequentialSurrogate(ABC):
    """A next-item recommender over item rows, trained online (``partial_fit``) or offline (``fit``).

    ``initial_rows``: on a stream the embedding table can start small and double as new items arrive, up to
    the capacity, so the table, its optimiser state and every checkpoint follow the catalogue in use. New rows
    are drawn Xavier-normal for the grown table's size from a generator seeded by (seed, rows): a restart
    grows exactly as an uninterrupted run. Old rows and their Adam moments are kept.
    """

    name: ClassVar[str]

    def __init__(self, n_items: int, hidden: int = 64, layers: int = 2, heads: int = 2, max_len: int = 50,
                 dropout: float = 0.5, lr: float = 1e-3, replay: int = 10_000, seed: int = 0,
                 initial_rows: int | None = None) -> None:
        self.seed = seed
        self.max_len = max_len
        self.hidden, self.layers, self.heads, self.dropout = hidden, layers, heads, dropout
        self.vocab = ItemVocab(n_items)
        if initial_rows is not None and initial_rows < 3:
            raise ValueError(f"initial_rows must be at least 3 (padding, OOV, one item), got {initial_rows}")
        rows = self.vocab.rows if initial_rows is None else min(initial_rows, self.vocab.rows)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = self.network(rows)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr, betas=(0.9, 0.98))
        self.generator = torch.Generator().manual_seed(seed)
        self.replay = TensorReservoir(replay, {"seqs": torch.zeros((0, max_len + 1), dtype=torch.int64)})
        self.steps = 0
        self.version = 0  # bumped by every update: influence estimates record which one they used

    # ------------------------------------------------------------------ what a surrogate defines

    @abstractmethod
    def network(self, rows: int) -> nn.Module:
        """A freshly initialised network with an item table of ``rows`` rows (the caller seeds torch)."""

    @abstractmethod
    def loss_inputs(self, batch: SeqBatch) -> tuple[Tensor, ...]:
        """``loss_model(*loss_inputs(rows))`` are the rows' deterministic losses (hashed draws, no RNG)."""

    @abstractmethod
    def train_inputs(self, seqs: Tensor) -> tuple[Tensor, ...]:
        """The inputs of one training step on ``seqs``, random draws from ``self.generator``."""

    @abstractmethod
    def represent(self, rows: Tensor) -> Tensor:
        """The state ``[B, H]`` the next item after each whole row is scored against (eval mode, no grad)."""

    @abstractmethod
    def influence_block(self) -> list[str]:
        """Names of the ``loss_model`` parameters influence and gradient norms are taken over."""

    # ------------------------------------------------------------------ scoring side (eval mode, deterministic)

    @property
    def rows(self) -> int:
        """Rows of the embedding table now (≤ ``vocab.rows``: it grows with the items seen)."""
        return int(self.item_table.num_embeddings)

    @property
    def item_table(self) -> nn.Embedding:
        table = self.model.item_emb
        assert isinstance(table, nn.Embedding)
        return table

    @property
    def loss_model(self) -> nn.Module:
        return self.model

    def _check(self, batch: SeqBatch) -> None:
        if len(batch) == 0:
            raise ValueError("empty batch: nothing to score")
        if int(batch.seqs.max()) >= self.rows or int(batch.seqs.min()) < 0:
            raise ValueError(f"item rows outside the embedding table [0, {self.rows}); map ids through the vocab")

    def losses(self, batch: SeqBatch) -> Tensor:
        """Per-sample losses ``[B]`` in eval mode (no dropout), with deterministic draws."""
        self._check(batch)
        self.model.eval()
        with torch.no_grad():
            return self.model(*self.loss_inputs(batch))

    def loss(self, batch: SeqBatch) -> Tensor:
        return self.losses(batch).mean()

    def embed(self, batch: SeqBatch) -> Tensor:
        """The sequence representation ``[B, H]`` of history + target."""
        self._check(batch)
        self.model.eval()
        rows = batch.seqs[:, -self.max_len:]
        out = torch.empty((len(rows), self.hidden))
        with torch.no_grad():  # rows of similar length in chunks, each trimmed to its longest row
            for chunk in length_buckets((rows != PAD).sum(1), batching.ROWS_PER_PASS):
                out[chunk] = self.represent(trim_padding(rows[chunk]))
        return out

    def score_items(self, batch: SeqBatch) -> Tensor:
        """Scores ``[B, rows]`` of every item as the next one after the whole row (history + target)."""
        h = self.embed(batch)
        with torch.no_grad():
            return h @ self.item_table.weight.T

    # ------------------------------------------------------------------ training side

    def _train_step(self, seqs: Tensor) -> float:
        """One optimiser step on the mean loss of ``seqs``. Rows beyond ``batching.ROWS_PER_PASS`` go forward and
        backward in passes whose gradients add up to the whole step's: a stream step has 1,024 rows, and
        the activations kept for their backward pass were the largest part of the scoring stage's memory.
        The passes group rows of similar length, each trimmed to its longest row (``batching.step_chunks``):
        a row's loss does not depend on its padding, so only the dropout masks' layout changes, not the step.
        On short-history streams the longest row of 1,024 set the width of every pass before."""
        self.model.train()
        inputs = self.train_inputs(seqs)
        dropout_seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        lengths = (seqs != PAD).sum(1)
        chunks = batching.step_chunks(lengths, batching.ROWS_PER_PASS)
        with torch.random.fork_rng(devices=[]):  # dropout from our generator: reproducible, checkpointable
            torch.manual_seed(dropout_seed)
            for chunk in chunks:
                if len(chunks) == 1:  # the whole step in one pass: its inputs as they are (the unchunked step)
                    losses = self.model(*inputs)
                else:  # every input is right-aligned with the rows (left padding): drop the columns that are
                    drop = seqs.shape[1] - max(2, int(lengths[chunk].max()))  # padding in all this pass's rows
                    losses = self.model(*(t[chunk][:, drop:] for t in inputs))
                # one chunk: the mean, as an unchunked step computes it (the same floating-point result)
                loss = losses.mean() if len(losses) == len(seqs) else losses.sum() / len(seqs)
                if not torch.isfinite(loss):
                    self.optimizer.zero_grad(set_to_none=True)
                    raise FloatingPointError(f"surrogate loss is {loss.item()}; refusing the update")
                loss.backward()
                total += float(loss.detach())
        self.optimizer.step()
        self.steps += 1
        self.version += 1
        return total

    def partial_fit(self, batch: SeqBatch, replay_ratio: float = 1.0, max_rows: int | None = None) -> float:
        """One step on the batch plus ``replay_ratio`` as many replayed earlier sequences; then remember the
        batch (reservoir). With ``max_rows`` the step uses a seeded random subset of that many new rows:
        on a stream a user's consecutive samples share their prefixes, so most positions repeat anyway."""
        self._check(batch)
        full = left_pad(batch.seqs, self.max_len + 1)
        seqs = full
        if max_rows is not None and len(seqs) > max_rows:
            seqs = seqs[torch.randperm(len(seqs), generator=self.generator)[:max_rows]]
        n_replay = min(len(self.replay), round(replay_ratio * len(seqs)))
        if n_replay:
            seqs = torch.cat([seqs, self.replay.sample(n_replay, self.generator)["seqs"]])
        loss = self._train_step(trim_padding(seqs))
        self.replay.add({"seqs": full}, self.generator)
        return loss

    def fit(self, batch: SeqBatch, epochs: int, batch_size: int = 128,
            progress: Callable[[int, float, float], None] | None = None) -> list[float]:
        """Offline training over all rows of ``batch`` for ``epochs``; returns the mean loss per epoch."""
        self._check(batch)
        history = []
        for epoch in range(epochs):
            started = time.perf_counter()
            # Shuffled batches, not length buckets: batches of one length train a different surrogate, whose
            # Games influence scores fail the streaming-fidelity check (tests/selection/test_fidelity.py).
            chunks = torch.split(torch.randperm(len(batch), generator=self.generator), batch_size)
            total = 0.0
            for chunk in chunks:
                rows = batch.select(chunk).seqs
                total += self._train_step(rows) * len(rows)
            history.append(total / len(batch))
            if progress is not None:
                progress(epoch, history[-1], time.perf_counter() - started)
        return history

    # ------------------------------------------------------------------ encoding

    def encode(self, histories: Iterable[Sequence[str]], targets: Iterable[str], sample_ids: Iterable[int],
               grow: bool = True) -> Encoded:
        """Map item ids to rows (adding new ones while there is room when ``grow``) and pad into a batch."""
        to_row = self.vocab.add if grow else self.vocab.lookup
        sequences = [[to_row(i) for i in h] + [to_row(t)] for h, t in zip(histories, targets, strict=True)]
        if grow and len(self.vocab) + 2 > self.rows:
            self._grow_table(min(self.vocab.rows, max(2 * self.rows, len(self.vocab) + 2)))
        return encode_sequences(sequences, list(sample_ids), self.max_len)

    def _grow_table(self, rows: int) -> None:
        """Enlarge the item embedding to ``rows``: old rows and their Adam moments kept, new rows drawn
        Xavier-normal for a table of this size from a generator seeded by (seed, rows)."""
        old = self.item_table
        new = nn.Embedding(rows, old.embedding_dim, padding_idx=PAD)
        std = math.sqrt(2.0 / (rows + old.embedding_dim))
        fresh = torch.Generator().manual_seed(self.seed * 1_000_003 + rows)
        with torch.no_grad():
            new.weight[:old.num_embeddings] = old.weight
            new.weight[old.num_embeddings:] = torch.randn((rows - old.num_embeddings, old.embedding_dim),
                                                          generator=fresh) * std
        self._replace_table(new)

    def _replace_table(self, new: nn.Embedding) -> None:
        """Swap the item embedding in the model and the optimiser (moments padded with zeros to its rows)."""
        old = self.item_table
        self.model.item_emb = new
        for group in self.optimizer.param_groups:
            group["params"] = [new.weight if p is old.weight else p for p in group["params"]]
        moments = self.optimizer.state.pop(old.weight, None)
        extra = new.num_embeddings - old.num_embeddings
        if moments and extra >= 0:  # (a smaller table only comes from a checkpoint, which brings its own moments)
            self.optimizer.state[new.weight] = {
                k: torch.cat([v, v.new_zeros((extra, *v.shape[1:]))]) if isinstance(v, Tensor) and v.dim() == 2 else v
                for k, v in moments.items()}

    # ------------------------------------------------------------------ state (safetensors + JSON, never pickle)

    def state_dict(self) -> State:
        """Weights, optimiser state, replay buffer, RNG state, vocabulary and counters."""
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        opt = self.optimizer.state_dict()
        for pid, st in opt["state"].items():
            for k, v in st.items():
                tensors[f"opt.{pid}.{k}"] = v if isinstance(v, Tensor) else torch.tensor(v)
        tensors["replay"] = self.replay.columns["seqs"]
        tensors["rng"] = self.generator.get_state()
        return State(tensors, {"surrogate": self.name, "vocab": self.vocab.to_dict(), "steps": self.steps,
                               "version": self.version, "seed": self.seed, "replay_seen": self.replay.seen,
                               "param_groups": opt["param_groups"]})

    def load_state_dict(self, state: State) -> None:
        t, meta = state.tensors, state.meta
        saved = meta.get("surrogate", "sasrec")  # checkpoints from before the other surrogates are SASRec's
        if saved != self.name:
            raise ValueError(f"this checkpoint holds a {saved} surrogate, not {self.name}: set scoring.surrogate "
                             f"to {saved!r} or start from an empty state directory")
        self.vocab = ItemVocab.from_dict(meta["vocab"])
        rows = int(t["model.item_emb.weight"].shape[0])
        if rows != self.rows:  # a table grown (or not yet) to another size: take the saved one's shape
            self._replace_table(nn.Embedding(rows, self.hidden, padding_idx=PAD))
        self.model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
        opt: dict[int, dict[str, Tensor]] = {}
        for k, v in t.items():
            if k.startswith("opt."):
                _, pid, name = k.split(".", 2)
                opt.setdefault(int(pid), {})[name] = v
        self.optimizer.load_state_dict({"state": opt, "param_groups": meta["param_groups"]})
        self.replay.columns["seqs"] = t["replay"]
        self.generator.set_state(t["rng"])
        self.steps, self.version, self.seed = meta["steps"], meta["version"], meta["seed"]
        self.replay.seen = meta["replay_seen"]


class CausalNetwork(Protocol):
    """A left-to-right network: the state after each position of its input rows."""

    def features(self, inputs: Tensor) -> Tensor: ...


def causal_losses(network: CausalNetwork, table: nn.Embedding, seqs: Tensor, negatives: Tensor) -> Tensor:
    """Per-sample mean BCE over the positions that have an input item: each predicts the item after it
    (``negatives`` is ``[B, L - 1]``)."""
    inputs, targets = seqs[:, :-1], seqs[:, 1:]
    return next_item_bce(network.features(inputs), table, targets, negatives, (inputs != PAD) & (targets != PAD))


class CausalSurrogate(SequentialSurrogate):
    """A left-to-right surrogate (SASRec, GRU4Rec): every position predicts the item after it, against one
    negative per position, hashed for scoring and random for training."""

    def represent(self, rows: Tensor) -> Tensor:
        """The state after the whole row: what predicts the item after it."""
        return cast(CausalNetwork, self.model).features(rows)[:, -1]

    def negatives(self, batch: SeqBatch) -> Tensor:
        return hashed_negatives(batch.sample_ids, batch.seqs.shape[1] - 1, self.rows, self.seed)

    def loss_inputs(self, batch: SeqBatch) -> tuple[Tensor, ...]:
        """The rows and their hashed negatives."""
        return batch.seqs, self.negatives(batch)

    def train_inputs(self, seqs: Tensor) -> tuple[Tensor, ...]:
        return seqs, torch.randint(2, self.rows, (seqs.shape[0], seqs.shape[1] - 1), generator=self.generator)


def next_item_bce(h: Tensor, table: nn.Embedding, targets: Tensor, negatives: Tensor, valid: Tensor) -> Tensor:
    """Per-sample mean binary cross-entropy over the ``valid`` positions: each position's state ``h`` against its
    target item and one sampled negative (SASRec's loss, which DEALRec's surrogate code trains with)."""
    pos_logit = (h * table(targets)).sum(-1)
    neg_logit = (h * table(negatives)).sum(-1)
    weight = valid.to(h.dtype)
    per_position = nn.functional.softplus(-pos_logit) + nn.functional.softplus(neg_logit)  # BCE, stable
    return (per_position * weight).sum(1) / weight.sum(1).clamp_min(1.0)


def init_xavier(module: nn.Module) -> None:
    """Xavier-normal for every matrix, as SASRec's reference; the padding row zero."""
    for param in module.parameters():
        if param.dim() > 1:
            nn.init.xavier_normal_(param)
    table = module.item_emb
    assert isinstance(table, nn.Embedding)
    with torch.no_grad():
        table.weight[PAD].zero_()
