"""SASRec, the small surrogate recommender that DEALRec scores samples with.

Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018; used as DEALRec's surrogate
(Lin et al., SIGIR 2024) with hidden size 64, 2 blocks, 2 heads, maximum length 50, dropout 0.5, and a
binary cross-entropy loss with one sampled negative per position. The architecture follows the
reference PyTorch port that DEALRec builds on (pmixer/SASRec.pytorch): scaled item embeddings plus
learned positions, pre-norm causal self-attention, point-wise feed-forward, a final layer norm, and
logits as dot products with the item embeddings.

Departures, and why:
- A sample's loss is the *mean* BCE over its positions (the reference averages over all positions of a
  batch): per-sample losses must not depend on what else is in the batch, and long and short histories
  must be comparable.
- Positions whose input is padding are not trained or scored (the reference trains the first item from an
  empty context), and attention never looks at padding (the reference lets zero-vector padding keys take
  softmax weight, so a row's output depends on how much padding its batch gives it). A sequence needs at least
  two items; shorter ones cannot form an input and are excluded
  by :func:`encode_sequences`, which reports how many — the reference code silently scores such users 0.
- Negatives for *scoring* are a deterministic hash of (seed, sample id, position), so a sample's loss, and
  every score derived from it, is the same whatever batch it sits in; training draws fresh random negatives.
- Negative sampling and batching are vectorised tensor operations (the reference samples in Python).
- ``partial_fit`` learns from each stream batch plus a bounded replay buffer of earlier sequences, so the
  surrogate follows the stream without forgetting.
- Item ids map to rows through :class:`ItemVocab` (0 padding, 1 out-of-vocabulary); new items of a stream
  take free rows until the table is full, after which they share the OOV row (and are counted).
- On a stream the embedding table can start small (``initial_rows``) and double as new items arrive, up to the
  capacity: the table, its optimiser state and every checkpoint then follow the catalogue in use, not the
  capacity (at the default 100,000 rows, every checkpoint rewrote 100,000 rows and their Adam moments).
  New rows are drawn Xavier-normal for the grown table's size (the reference initialises a catalogue-sized
  table so), old rows and their Adam moments are kept. Negatives are drawn over the rows of the current table.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

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


class _PointWiseFeedForward(nn.Module):
    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(hidden, hidden), nn.Dropout(dropout), nn.ReLU(), nn.Linear(hidden, hidden), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


class SASRec(nn.Module):
    """The network. ``forward(seqs, negatives)`` returns per-sample losses, so ``torch.func`` can use it directly."""

    def __init__(self, n_rows: int, hidden: int = 64, layers: int = 2, heads: int = 2, max_len: int = 50,
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.hidden, self.max_len, self.heads = hidden, max_len, heads
        self.item_emb = nn.Embedding(n_rows, hidden, padding_idx=PAD)
        self.pos_emb = nn.Embedding(max_len, hidden)
        self.emb_dropout = nn.Dropout(dropout)
        self.attention_norms = nn.ModuleList(nn.LayerNorm(hidden, eps=1e-8) for _ in range(layers))
        self.attentions = nn.ModuleList(
            nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True) for _ in range(layers)
        )
        self.forward_norms = nn.ModuleList(nn.LayerNorm(hidden, eps=1e-8) for _ in range(layers))
        self.forwards = nn.ModuleList(_PointWiseFeedForward(hidden, dropout) for _ in range(layers))
        self.last_norm = nn.LayerNorm(hidden, eps=1e-8)
        causal = torch.triu(torch.ones(max_len, max_len, dtype=torch.bool), diagonal=1)
        self.register_buffer("causal_mask", causal, persistent=False)
        for param in self.parameters():  # as the reference: Xavier-normal for every matrix
            if param.dim() > 1:
                nn.init.xavier_normal_(param)
        with torch.no_grad():
            self.item_emb.weight[PAD].zero_()

    def features(self, inputs: Tensor) -> Tensor:
        """Hidden states ``[B, L, H]`` for input rows ``[B, L]`` (L ≤ max_len, left-padded)."""
        length = inputs.shape[1]
        x = self.item_emb(inputs) * math.sqrt(self.hidden)
        x = x + self.pos_emb.weight[self.max_len - length:].unsqueeze(0)
        x = self.emb_dropout(x)
        pad = inputs == PAD
        keep = (~pad).unsqueeze(-1).to(x.dtype)
        x = x * keep
        # causal, and padding keys hidden (every position still sees itself, so no row is fully masked):
        # without this, how much padding a row carries would change its outputs
        eye = torch.eye(length, dtype=torch.bool)
        mask = self.get_buffer("causal_mask")[:length, :length].unsqueeze(0) | (pad.unsqueeze(1) & ~eye)
        mask = mask.repeat_interleave(self.heads, dim=0)
        for norm, attention, fnorm, ffn in zip(self.attention_norms, self.attentions, self.forward_norms,
                                               self.forwards, strict=True):
            q = norm(x)
            out, _ = attention(q, x, x, attn_mask=mask, need_weights=False)
            x = fnorm(q + out)
            x = ffn(x) * keep
        return self.last_norm(x)

    def forward(self, seqs: Tensor, negatives: Tensor) -> Tensor:
        """Per-sample mean BCE over the positions that have an input item; ``negatives`` is ``[B, L]``."""
        inputs, targets = seqs[:, :-1], seqs[:, 1:]
        h = self.features(inputs)
        pos_logit = (h * self.item_emb(targets)).sum(-1)
        neg_logit = (h * self.item_emb(negatives)).sum(-1)
        valid = ((inputs != PAD) & (targets != PAD)).to(h.dtype)
        per_position = nn.functional.softplus(-pos_logit) + nn.functional.softplus(neg_logit)  # BCE, stable
        return (per_position * valid).sum(1) / valid.sum(1).clamp_min(1.0)


class SASRecSurrogate:
    """SASRec behind the :class:`~recsift.scoring.surrogate.Surrogate` protocol."""

    name = "sasrec"

    def __init__(self, n_items: int, hidden: int = 64, layers: int = 2, heads: int = 2, max_len: int = 50,
                 dropout: float = 0.5, lr: float = 1e-3, replay: int = 10_000, seed: int = 0,
                 initial_rows: int | None = None) -> None:
        self.seed = seed
        self.max_len = max_len
        self.vocab = ItemVocab(n_items)
        if initial_rows is not None and initial_rows < 3:
            raise ValueError(f"initial_rows must be at least 3 (padding, OOV, one item), got {initial_rows}")
        rows = self.vocab.rows if initial_rows is None else min(initial_rows, self.vocab.rows)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = SASRec(rows, hidden, layers, heads, max_len, dropout)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr, betas=(0.9, 0.98))
        self.generator = torch.Generator().manual_seed(seed)
        self.replay = TensorReservoir(replay, {"seqs": torch.zeros((0, max_len + 1), dtype=torch.int64)})
        self.steps = 0
        self.version = 0  # bumped by every update: influence estimates record which one they used

    # ------------------------------------------------------------------ scoring side (eval mode, deterministic)

    @property
    def rows(self) -> int:
        """Rows of the embedding table now (≤ ``vocab.rows``: it grows with the items seen)."""
        return int(self.model.item_emb.num_embeddings)

    def negatives(self, batch: SeqBatch) -> Tensor:
        return hashed_negatives(batch.sample_ids, batch.seqs.shape[1] - 1, self.rows, self.seed)

    # ------------------------------------------------------------------ what influence-style scorers use

    @property
    def loss_model(self) -> nn.Module:
        return self.model

    def loss_inputs(self, batch: SeqBatch) -> tuple[Tensor, ...]:
        """``loss_model(*loss_inputs(rows))`` are the rows' losses: the rows and their hashed negatives."""
        return batch.seqs, self.negatives(batch)

    def influence_block(self) -> list[str]:
        """DEALRec's parameter block: the output projection of the last attention layer."""
        names = [k for k, _ in self.model.named_parameters() if k.startswith("attentions.") and ".out_proj." in k]
        last = max(int(k.split(".")[1]) for k in names)
        return [k for k in names if int(k.split(".")[1]) == last]

    def _check(self, batch: SeqBatch) -> None:
        if len(batch) == 0:
            raise ValueError("empty batch: nothing to score")
        if int(batch.seqs.max()) >= self.rows or int(batch.seqs.min()) < 0:
            raise ValueError(f"item rows outside the embedding table [0, {self.rows}); map ids through the vocab")

    def losses(self, batch: SeqBatch) -> Tensor:
        """Per-sample losses ``[B]`` in eval mode (no dropout), with deterministic negatives."""
        self._check(batch)
        self.model.eval()
        with torch.no_grad():
            return self.model(batch.seqs, self.negatives(batch))

    def loss(self, batch: SeqBatch) -> Tensor:
        return self.losses(batch).mean()

    def embed(self, batch: SeqBatch) -> Tensor:
        """The sequence representation ``[B, H]``: the last position's state over history + target."""
        self._check(batch)
        self.model.eval()
        rows = batch.seqs[:, -self.max_len:]
        out = torch.empty((len(rows), self.model.hidden))
        with torch.no_grad():  # rows of similar length in chunks of 1024, each trimmed to its longest row
            for chunk in length_buckets((rows != PAD).sum(1), 1024):
                out[chunk] = self.model.features(trim_padding(rows[chunk]))[:, -1]
        return out

    def score_items(self, batch: SeqBatch) -> Tensor:
        """Scores ``[B, rows]`` of every item as the next one after the whole row (history + target)."""
        h = self.embed(batch)
        with torch.no_grad():
            return h @ self.model.item_emb.weight.T

    # ------------------------------------------------------------------ training side

    def _train_step(self, seqs: Tensor) -> float:
        self.model.train()
        negatives = torch.randint(2, self.rows, (seqs.shape[0], seqs.shape[1] - 1), generator=self.generator)
        dropout_seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        with torch.random.fork_rng(devices=[]):  # dropout from our generator: reproducible, checkpointable
            torch.manual_seed(dropout_seed)
            loss = self.model(seqs, negatives).mean()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"surrogate loss is {loss.item()}; refusing the update")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.optimizer.step()
        self.steps += 1
        self.version += 1
        return float(loss.detach())

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
        Xavier-normal for a table of this size from a generator seeded by (seed, rows): deterministic, so a
        restart grows exactly as an uninterrupted run."""
        old = self.model.item_emb
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
        old = self.model.item_emb
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
        return State(tensors, {"vocab": self.vocab.to_dict(), "steps": self.steps, "version": self.version,
                               "seed": self.seed, "replay_seen": self.replay.seen,
                               "param_groups": opt["param_groups"]})

    def load_state_dict(self, state: State) -> None:
        t, meta = state.tensors, state.meta
        self.vocab = ItemVocab.from_dict(meta["vocab"])
        rows = int(t["model.item_emb.weight"].shape[0])
        if rows != self.rows:  # a table grown (or not yet) to another size: take the saved one's shape
            self._replace_table(nn.Embedding(rows, self.model.hidden, padding_idx=PAD))
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
