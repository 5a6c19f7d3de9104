"""The decoder-only Transformer shared by every system, with a preallocated KV cache.

attention -> MLP -> block -> Backbone. Pre-LayerNorm, sinusoidal absolute positions
(no length limit, so the max-length guard, not the model, bounds generation), causal
self-attention through ``F.scaled_dot_product_attention`` (flash kernels on GPU).

Batches may be left- or right-padded: ``key_valid`` (B, T) marks real positions, and
``positions`` (B, T) gives each real token its index inside its own sequence
(:func:`packed_positions`). Every system drives a generation the same way:
:meth:`Backbone.prefill` runs the padded prompt into a fresh cache, then
:meth:`Backbone.step` feeds one new token per row.
"""

from __future__ import annotations

import contextlib
import math
import time
import weakref
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


def lengths_to_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B,) lengths -> (B, max_len) bool, True inside each sequence."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def packed_positions(valid: torch.Tensor) -> torch.Tensor:
    """(B, S) key_valid -> (B, S) each token's index among the real tokens of its own sequence.

    Padding gaps don't advance the count, so a sequence reads the same whatever padding its
    batch needed; padded slots get their neighbour's index (0 before the first real token).
    """
    return (valid.long().cumsum(-1) - 1).clamp_min(0)


def sinusoidal_positions(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, T) integer positions -> (B, T, dim) sinusoidal embeddings."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    angles = positions.to(torch.float32).unsqueeze(-1) * freqs  # (B, T, half)
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def prepare_for_decoding(model: nn.Module) -> None:
    """Put ``model`` in eval mode and, on CPU, store every Linear weight transposed (in place).

    Every generation calls this first. The weights keep their values, shape and dtype; only
    their memory order changes, to (in, out)-contiguous. A decoding step multiplies one to a
    few rows by each weight, and CPU BLAS runs those small GEMMs 1.4-2x faster when it is handed
    the weight in this order (bench/generation.py: a tiny step is ~26 such GEMMs). Sums are
    accumulated in another order, so outputs move by float rounding (~1e-6), nothing more.
    Training still works on a model in this layout (gradients follow the parameter's strides);
    checkpoints load either way. GPU weights are left alone: cuBLAS takes both orders at the
    same speed.
    """
    model.eval()
    for m in model.modules():
        w = m.weight if isinstance(m, nn.Linear) else None
        if w is not None and w.device.type == "cpu" and w.dim() == 2 and w.is_contiguous() and min(w.shape) > 1:
            with torch.no_grad():
                m.weight.data = w.data.t().contiguous().t()


def check_cache_dtype(name: str) -> torch.dtype:
    """The KV cache dtype called ``name`` (``float32``, the default, or ``bfloat16``).

    A bf16 cache halves the bytes a decoding step reads from it and runs its attention in bf16.
    Whether that is faster depends on the CPU's bf16 kernels: on an Intel Xeon VM, batch-16
    attention was 36 % faster (448 -> 287 us per layer over 300 positions); on an AMD EPYC (Zen 5)
    VM, whole generations were 30-50 % slower at batch 1 and 16 (docs/results.md). The attention
    output moves by ~1e-3 (bf16 keeps 8 bits of mantissa), so sampled generations differ from
    float32 ones. Off by default; measure with ``bench.generation_ratios --kv-cache-dtype``.
    """
    from meld.config import KV_CACHE_DTYPES

    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"KV cache dtype must be one of {sorted(KV_CACHE_DTYPES)}, got {name!r}")
    return getattr(torch, name)


@contextlib.contextmanager
def decoding_kernels(device: torch.device | str):
    """ATen's own CPU kernels, not oneDNN's, for a decoding step (:meth:`Backbone.step`; a no-op off the CPU).

    For contiguous fp32 CPU input, GELU goes through a oneDNN primitive whose fixed cost is
    ~12 us on this machine: 14.6 us for one decoding row of 768 values against 2.2 us from
    ATen's kernel (1 thread), four times per step in the tiny model, ~9 % of its batch-1
    decoding time (docs/results.md, issue 6). The two kernels agree to float rounding (1.2e-6 on
    GELU). The switch is process-wide for the step's duration (torch has no per-thread one), so
    a conv running in another thread meanwhile would also skip oneDNN: slower, never wrong.
    """
    if torch.device(device).type != "cpu":
        yield
        return
    before = torch.backends.mkldnn.enabled  # (not mkldnn.flags(): it warns about TF32 on every entry)
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


class KVCache:
    """Preallocated keys and values for every layer, in one tensor: (layers, 2, B, heads, max_len, head_dim).

    Keys and values sit side by side (``kv[:, 0]``, ``kv[:, 1]``) because the fused QKV
    projection yields them side by side: a decoding step stores both with one copy per layer.

    ``length`` is the number of positions filled so far (shared by the batch: padded
    positions are masked through ``key_valid``). ``select(idx)`` keeps a subset of the
    batch, so finished sequences can leave a batched generation. ``all_valid`` says that
    every filled position of every row is real, which lets a one-token step attend without
    a mask.
    """

    def __init__(self, n_layers: int, batch: int, n_heads: int, max_len: int, head_dim: int, device, dtype,
                 fixed_shape: bool = False, store: CacheStore | None = None):
        self.store = store  # where a fixed-shape cache takes its tensors (None: its own)
        self.kv, self.key_valid = self._tensors((n_layers, 2, batch, n_heads, max_len, head_dim), device, dtype)
        self.length = 0
        self.max_len = max_len
        self.all_valid = True
        self.fixed_shape = fixed_shape
        self.rows = batch  # live rows; with a fixed shape the first ``rows`` of ``kv``'s batch axis
        self.static_kv = None  # the ``kv`` tensor last marked as a CUDA graph's static input (Backbone._step_fixed)

    def select(self, idx: torch.Tensor) -> None:
        """Keep (and reorder, or repeat) the live rows ``idx``.

        A fixed-shape cache (:meth:`Backbone.prefill` with ``fixed_shape``) keeps its tensors:
        the selected rows are copied to the front of the same storage, so a compiled step (and a
        CUDA graph recorded on those addresses) stays valid. It only takes new tensors to grow (a beam
        search's first select repeats every row K times), which compiles once per shape; they come
        from the backbone's :class:`CacheStore`, so the next search of that shape finds the same ones.
        """
        n = len(idx)
        if self.fixed_shape and n <= self.kv.shape[2]:
            self.kv[:, :, :n] = self.kv[:, :, idx]  # the right side is a gathered copy: overlap is safe
            self.key_valid[:n] = self.key_valid[idx]
        elif self.store is not None:  # growing: into the store's tensors, so the next such search reuses them
            shape = (*self.kv.shape[:2], n, *self.kv.shape[3:])
            kv, key_valid = self._tensors(shape, self.kv.device, self.kv.dtype)
            kv.copy_(self.kv[:, :, idx])
            key_valid.copy_(self.key_valid[idx])
            self.kv, self.key_valid = kv, key_valid
        else:
            self.kv = self.kv[:, :, idx]
            self.key_valid = self.key_valid[idx]
        self.rows = n
        # rows drawn from an all-valid cache are all valid; otherwise the rows that stay may be the ones
        # without padding, which a host read finds out (one per select, not per decoding step)
        if not self.all_valid:
            self.all_valid = bool(self.key_valid[:n, : self.length].all())

    def _tensors(self, shape: tuple, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed keys and values of ``shape`` and their (batch, max_len) mask: the store's, or new ones."""
        if self.store is not None:
            return self.store.take(self, shape, device, dtype)
        return zeroed_cache_tensors(shape, device, dtype)

    def admit(self, T: int, key_valid: torch.Tensor | None = None) -> None:
        """Record which of the next ``T`` positions are real keys (``key_valid`` (B, T); None: all), before
        a forward call builds its mask over them; ``length`` moves on only once the call has stored them."""
        start = self.length
        if start + T > self.max_len:
            raise RuntimeError(f"KV cache overflow: {start + T} positions > max_len {self.max_len}")
        if key_valid is None:
            self.key_valid[:, start : start + T] = True
        else:
            self.key_valid[:, start : start + T] = key_valid
            # one host sync per call that brings padding (a prefill), none per decoding step
            self.all_valid = self.all_valid and bool(key_valid.all())

    @property
    def k(self) -> torch.Tensor:
        """(layers, B, heads, max_len, head_dim) keys (a view)."""
        return self.kv[:, 0]

    @property
    def v(self) -> torch.Tensor:
        """(layers, B, heads, max_len, head_dim) values (a view)."""
        return self.kv[:, 1]

    @property
    def batch_size(self) -> int:
        return self.rows


def zeroed_cache_tensors(shape: tuple, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """New zeroed (layers, 2, B, heads, max_len, head_dim) keys and values and their (B, max_len) mask."""
    return (torch.zeros(shape, device=device, dtype=dtype),
            torch.zeros(shape[2], shape[4], dtype=torch.bool, device=device))


class CacheStore:
    """A backbone's fixed-shape KV-cache tensors, handed out again from one generation call to the next.

    A CUDA graph replays on the addresses it was recorded on, and torch's cudagraph trees record a
    step again whenever a static input (the cache, :meth:`Backbone._step_fixed`) sits at a new
    address. With a fresh cache per call, every batch of an evaluation would pay a new recording
    and leave one more graph behind; a beam search's grown cache, once per search. Here tensors of
    one shape go back out, zeroed, once the cache that held them is gone (never to two live caches).
    At most ``keep`` shapes are kept, the least recently used dropped first, so a run meeting many
    shapes does not hold a cache's memory for each; a live cache keeps its tensors either way.
    """

    def __init__(self, keep: int = 4):
        self.keep = keep
        self._slots: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor, weakref.ref]] = OrderedDict()

    def take(self, holder: KVCache, shape: tuple, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed (shape) keys and values and their (batch, max_len) mask, for ``holder`` while it lives."""
        # inference tensors cannot be written outside inference mode: one slot per mode
        key = (tuple(shape), torch.device(device), dtype, torch.is_inference_mode_enabled())
        slot = self._slots.pop(key, None)
        if slot is not None and slot[2]() is None:
            kv, key_valid = slot[0].zero_(), slot[1].zero_()  # zeroed: a stale NaN times a 0 weight is NaN
        else:
            kv, key_valid = zeroed_cache_tensors(shape, device, dtype)
        self._slots[key] = (kv, key_valid, weakref.ref(holder))
        while len(self._slots) > self.keep:
            self._slots.popitem(last=False)
        return kv, key_valid

    def __len__(self) -> int:
        return len(self._slots)

    def __reduce__(self):
        # copied or pickled empty: a weight-sharing copy or a model sent to a Ray actor needs no caches
        return (CacheStore, (self.keep,))


def cached_attention(qkv: torch.Tensor, mask: torch.Tensor | None, cache: KVCache, layer: int) -> torch.Tensor:
    """Attention of T new positions over ``cache``'s layer ``layer``, their own keys and values stored first.

    qkv: (3, B, H, T, Dh) queries, keys and values (any strides); mask: see :meth:`Backbone.attention_mask`.
    Returns (B, H, T, Dh) in the queries' dtype. Its own function so that ``bench.generation_ratios``
    can time exactly this, without the rest of a decoding step.
    """
    start = cache.length
    end = start + qkv.shape[3]
    cache.kv[layer, :, :, :, start:end] = qkv[1:]  # keys and values in one copy (cast to the cache's dtype)
    kv = cache.kv[layer, :, :, :, :end]  # (2, B, H, end, Dh)
    q = qkv[0]
    if kv.dtype != q.dtype:  # a bf16 cache: attention in bf16, the rest of the step in the weights' dtype
        return F.scaled_dot_product_attention(q.to(kv.dtype), kv[0], kv[1], attn_mask=mask).to(q.dtype)
    return F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None, layer: int
    ) -> torch.Tensor:
        """x: (B, T, D) -> (B, T, D); ``mask`` from :meth:`Backbone.attention_mask`, shared by every layer.

        Without a cache, ``mask`` None means plain causal attention; with one, no mask at all
        (one query at the newest position, every key real).
        """
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, T, Dh)
        if cache is None:
            q, k, v = qkv.unbind(0)
            p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=p)
        else:
            y = cached_attention(qkv, mask, cache, layer)
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.proj(y)

    def forward_fixed(self, x: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One query per row against this layer's whole preallocated cache plus its own new key, shapes
        fixed whatever the step.

        x: (B, 1, D); kv: (2, B, H, max_len, Dh), read only; mask: (B, 1, 1, max_len), True on the real
        keys before this step's position. Returns the (B, 1, D) output and this step's (2, B, H, 1, Dh)
        key and value, which the caller writes into the cache for every layer at once: an in-place
        write to a view of a compiled graph's input is functionalised into a copy of the whole
        cache (39 ms a step for the tiny model at batch 16 on a CPU), one write to the whole input
        is done in place. So attention is written out here: softmax over the cached scores and the
        new key's score together, then both weighted sums.
        """
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, 1, Dh)
        new_kv = qkv[1:].to(kv.dtype)  # what the cache will hold: a bf16 cache rounds the new key too
        q = qkv[0]
        k_new, v_new = new_kv.to(q.dtype).unbind(0)
        scale = self.head_dim**-0.5
        cached = torch.matmul(q.to(kv.dtype), kv[0].transpose(-1, -2)).to(q.dtype) * scale  # (B, H, 1, max_len)
        cached = cached.masked_fill(~mask, float("-inf"))
        own = (q * k_new).sum(-1, keepdim=True) * scale  # (B, H, 1, 1)
        p = torch.softmax(torch.cat([cached, own], dim=-1), dim=-1)
        y = torch.matmul(p[..., :-1].to(kv.dtype), kv[1]).to(q.dtype) + p[..., -1:] * v_new  # (B, H, 1, Dh)
        return self.proj(y.transpose(1, 2).reshape(B, T, D)), new_kv


class MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff)
        self.out = nn.Linear(d_ff, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.out(F.gelu(self.fc(x)))
        return self.drop(y) if self.training else y  # no module call per decoding step


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, d_ff, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, mask, cache, layer):
        a = self.attn(self.ln1(x), mask, cache, layer)
        x = x + (self.drop(a) if self.training else a)  # dropout is the identity in eval: skip the call
        return x + self.mlp(self.ln2(x))

    def forward_fixed(self, x, kv, mask):
        """:meth:`forward` of a fixed-shape decoding step (eval only; :meth:`CausalSelfAttention.forward_fixed`):
        returns the output and this layer's new key and value."""
        a, new_kv = self.attn.forward_fixed(self.ln1(x), kv, mask)
        x = x + a
        return x + self.mlp(self.ln2(x)), new_kv


class Backbone(nn.Module):
    """Decoder-only Transformer over already-embedded inputs.

    Args:
        d_model: width (paper: 1024).
        n_layers: blocks (paper: 12).
        n_heads: attention heads (paper: 16).
        d_ff: feed-forward width (paper: 4096).
        dropout: residual/attention dropout (paper: 0.2).
    """

    def __init__(self, d_model: int, n_layers: int, n_heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.d_model, self.n_layers, self.n_heads = d_model, n_layers, n_heads
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_ff, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self._position_tables: dict[tuple, torch.Tensor] = {}
        self.fixed_shape_decoding = False  # set by configure_decoding
        self._compiled_step = None
        self._cache_store = CacheStore()  # the fixed-shape caches' tensors, reused across calls
        # seconds in the compiled step's first call of each shape (its compile, with one step): kept
        # apart so that a real-time factor is the decoding's, not torch.compile's (decoding_compile_seconds)
        self.compile_seconds = 0.0
        self._compiled_shapes: set[tuple] = set()

    def new_cache(self, batch: int, max_len: int, device=None, dtype=None) -> KVCache:
        p = next(self.parameters())
        device, dtype = device or p.device, dtype or p.dtype
        if self.fixed_shape_decoding:  # few distinct lengths: each new shape is a recompile
            max_len = -(-max_len // FIXED_SHAPE_LENGTH_STEP) * FIXED_SHAPE_LENGTH_STEP
        # every position this cache can hold, computed now, in the dtype the steps add it to (the
        # activations', i.e. the weights'), not the cache's: a bf16 table would never be read
        self._position_table(max_len, device, p.dtype)
        return KVCache(self.n_layers, batch, self.n_heads, max_len, self.d_model // self.n_heads, device, dtype,
                       fixed_shape=self.fixed_shape_decoding,
                       store=self._cache_store if self.fixed_shape_decoding else None)

    def _position_table(self, length: int, device, dtype) -> torch.Tensor:
        """Sinusoidal rows 0..length-1 (at least), kept between calls and grown by doubling.

        A decoding step then looks its position up with one gather instead of the ~10 small ops
        of :func:`sinusoidal_positions`, a sizeable share of a tiny model's step. The rows are
        bit-identical to computing them directly (elementwise ops; checked in the tests). Not a
        buffer: it is derived, so checkpoints stay as they are.
        """
        key = (torch.device(device), dtype)
        table = self._position_tables.get(key)
        if table is None or table.shape[0] < length:
            n = max(length, 2 * table.shape[0] if table is not None else 256)
            table = sinusoidal_positions(torch.arange(n, device=device)[None], self.d_model)[0].to(dtype)
            self._position_tables[key] = table
        return table

    @staticmethod
    def attention_mask(
        T: int, key_valid: torch.Tensor | None, cache: KVCache | None, bidirectional_prefix: int = 0,
        device: torch.device | None = None,
    ) -> torch.Tensor | None:
        """The boolean attention mask of one forward call, built once and shared by every layer.

        Args:
            T: new positions in this call.
            key_valid: (B, T) real tokens among them, or None (all real).
            cache: the cache this call extends, its ``key_valid`` already holding the new positions.
            bidirectional_prefix: the first this many slots (of the whole sequence, cache included)
                also see each other ahead of themselves (a prefix LM: STT's frame block, which is
                given whole before any text is decoded). 0: plain causal.
            device: where to build the mask (the inputs' device).

        Returns:
            without a cache: None (plain causal) when ``key_valid`` is None and there is no
            prefix, else (B or 1, 1, T, T);
            with one: None for a one-token step when every key is real, else (B, 1, T, length + T).
            True = may attend. A query always sees itself, so a padded query row has a key
            and gives no NaN.
        """
        start = cache.length if cache is not None else 0
        end = start + T
        prefix = min(bidirectional_prefix, end)
        if cache is None and key_valid is None and prefix == 0:
            return None
        if cache is not None and T == 1 and cache.all_valid and start >= prefix:
            return None
        if cache is not None and T == 1 and start >= prefix:
            # a decoding step over a padded cache: its one query, at the newest position, may see every
            # cached key, so the mask is the cache's record of real keys (its newest one set just now),
            # a view: no new tensors, and none of the ~8 small ops (kernel launches on a GPU) below
            return cache.key_valid[:, None, None, :end]
        q_pos = torch.arange(start, end, device=device)
        k_pos = torch.arange(end, device=device)
        allowed = k_pos[None, :] <= q_pos[:, None]  # (T, end) causal
        if prefix:
            allowed = allowed | ((q_pos[:, None] < prefix) & (k_pos[None, :] < prefix))
        if cache is not None:
            valid = cache.key_valid[:, :end]
        elif key_valid is not None:
            valid = key_valid
        else:
            valid = torch.ones(1, end, dtype=torch.bool, device=device)
        mask = allowed[None, None] & valid[:, None, None, :]  # (B, 1, T, end)
        return mask | (k_pos[None, :] == q_pos[:, None])[None, None]

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        key_valid: torch.Tensor | None = None,
        cache: KVCache | None = None,
        bidirectional_prefix: int = 0,
    ) -> torch.Tensor:
        """Run the stack.

        Args:
            x: (B, T, D) input embeddings.
            positions: (B, T) position of each token in its own sequence; default 0..T-1 (+ cache length).
            key_valid: (B, T) True for real tokens; default all real.
            cache: when given, ``x`` continues the cached prefix and the cache is extended in place.
            bidirectional_prefix: see :meth:`attention_mask`.

        Returns:
            (B, T, D) final hidden states (after the last LayerNorm).
        """
        B, T, _ = x.shape
        offset = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(offset, offset + T, device=x.device).expand(B, T)
        if cache is not None:
            cache.admit(T, key_valid)
        mask = self.attention_mask(T, key_valid, cache, bidirectional_prefix, x.device)
        if cache is not None:  # a table lookup: no new tensor ops unless the table must grow
            pos_emb = self._position_table(cache.max_len, x.device, x.dtype)[positions]
        else:
            pos_emb = sinusoidal_positions(positions, self.d_model).to(x.dtype)
        h = x + pos_emb
        if self.training:
            h = self.drop(h)
        for i, block in enumerate(self.blocks):
            h = block(h, mask, cache, i)
        if cache is not None:
            cache.length = offset + T
        return self.ln_f(h)

    def prefill(
        self, x: torch.Tensor, valid: torch.Tensor, last: torch.Tensor | int, extra_len: int,
        bidirectional_prefix: int = 0, return_states: bool = False, cache_dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, KVCache, torch.Tensor] | tuple[torch.Tensor, KVCache, torch.Tensor, torch.Tensor]:
        """Run a padded prompt into a fresh cache, ready for :meth:`step`.

        Args:
            x: (B, S, D) embedded prompts; valid: (B, S) their real tokens.
            last: (B,) index of each row's last real token (or one index for all rows): its
                hidden state predicts the first new token.
            extra_len: positions to reserve after the prompt for the tokens to come.
            bidirectional_prefix: see :meth:`attention_mask`.
            return_states: also return every prompt position's hidden state (B, S, D), for callers
                that read more than the last one (STT's CTC head reads the frame states).
            cache_dtype: the keys' and values' dtype (default: the weights'); see :func:`check_cache_dtype`.

        Returns:
            h_last: (B, D) hidden states at ``last``;
            cache: holding the S prompt positions, room for ``extra_len`` more;
            next_pos: (B,) position of each row's next token;
            (with ``return_states``) h: (B, S, D).
        """
        B, S, _ = x.shape
        positions = packed_positions(valid)  # (B, S)
        cache = self.new_cache(B, S + extra_len, dtype=cache_dtype)
        h = self(x, positions, valid, cache, bidirectional_prefix)  # (B, S, D)
        rows = torch.arange(B, device=x.device)
        if return_states:
            return h[rows, last], cache, positions[rows, last] + 1, h
        return h[rows, last], cache, positions[rows, last] + 1

    def step(self, emb: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed one real token per row: (b, D) embeddings at (b,) positions -> (b, D) hidden states.

        Every system's decoding loop steps through here, so this is where oneDNN is switched off
        (:func:`decoding_kernels`: its GELU primitive's fixed cost dominates one-row steps), and
        where a fixed-shape cache (:func:`configure_decoding`) takes the compiled step."""
        with decoding_kernels(emb.device):
            if cache.fixed_shape:
                return self._step_fixed(emb, positions, cache)
            return self(emb[:, None], positions[:, None], None, cache)[:, 0]

    def _step_fixed(self, emb: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """:meth:`step` with every shape fixed: the batch padded to the cache's allocated rows (rows
        that have left hold stale values and are computed and dropped) and attention over every
        ``max_len`` position under a mask. Same outputs as the sliced step to float rounding."""
        if cache.length >= cache.max_len:
            raise RuntimeError(f"KV cache overflow: {cache.length + 1} positions > max_len {cache.max_len}")
        b, B = emb.shape[0], cache.kv.shape[2]
        # new tensors even when b == B: an input made outside inference mode (the prefill's
        # positions) and one made inside it would otherwise compile twice
        emb = torch.cat([emb, emb.new_zeros(B - b, emb.shape[1])])
        positions = torch.cat([positions, positions.new_zeros(B - b)])
        slot = torch.full((1,), cache.length, dtype=torch.long, device=emb.device)
        # exactly max_len rows (positions stay below it): the shared table grows by doubling, and a
        # new length of it would be one more shape to compile
        table = self._position_table(cache.max_len, emb.device, emb.dtype)[: cache.max_len]
        step = self._fixed_shape_step
        if self._compiled_step is not None:
            step = self._compiled_step
            if emb.device.type == "cuda":
                # CUDA graphs replay on fixed addresses: the cache is updated in place, not copied in,
                # and its tensors come from the CacheStore, so the next call's cache has the same ones.
                # Marked once per cache tensor (a select that grows the batch takes other ones)
                if cache.static_kv is not cache.kv:
                    torch._dynamo.mark_static_address(cache.kv)
                    torch._dynamo.mark_static_address(cache.key_valid)
                    cache.static_kv = cache.kv
                torch.compiler.cudagraph_mark_step_begin()
        compiling = False
        if self._compiled_step is not None:  # the key only where a step compiles: nothing more per eager step
            shape = (B, cache.max_len, cache.kv.dtype, emb.dtype, emb.device, torch.is_inference_mode_enabled(),
                     torch.is_grad_enabled())
            compiling = shape not in self._compiled_shapes
        if compiling:
            _synchronize(emb.device)  # the queued work before it is not the compile's
            start = time.perf_counter()
        h = step(emb, positions, cache.kv, cache.key_valid, slot, table)
        if compiling:
            _synchronize(emb.device)
            self.compile_seconds += time.perf_counter() - start
            self._compiled_shapes.add(shape)
        cache.length += 1
        # a CUDA-graph output is overwritten by the next replay: hand the caller its own copy
        return h[:b].clone() if self._compiled_step is not None else h[:b]

    def _fixed_shape_step(self, emb, positions, kv, key_valid, slot, table) -> torch.Tensor:
        """The tensor-only body of a fixed-shape step, the function :func:`configure_decoding` compiles.

        emb: (B, D); positions: (B,); kv: the cache's (layers, 2, B, H, max_len, Dh) tensor and
        key_valid its (B, max_len) mask, both updated in place; slot: (1,) the position written;
        table: the sinusoidal rows. Returns (B, D) hidden states.
        """
        k_pos = torch.arange(key_valid.shape[1], device=emb.device)
        mask = (key_valid & (k_pos < slot))[:, None, None, :]  # (B, 1, 1, max_len): earlier real keys
        h = (emb + table[positions])[:, None]  # (B, 1, D)
        new_kv = []
        for i, block in enumerate(self.blocks):
            h, layer_kv = block.forward_fixed(h, kv[i], mask)
            new_kv.append(layer_kv)
        # whole-tensor writes only (see CausalSelfAttention.forward_fixed): done in place when compiled
        kv.index_copy_(4, slot, torch.stack(new_kv))
        key_valid.index_fill_(1, slot, True)
        return self.ln_f(h)[:, 0]


FIXED_SHAPE_LENGTH_STEP = 256  # a fixed-shape cache's max_len is a multiple of this: few shapes to compile
RECOMPILE_LIMIT = 64  # compiled shapes allowed per decoding step function (torch's default: 8)


def _synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued kernels (a CPU runs none asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def configure_decoding(model: nn.Module, *, fixed_shape: bool = False, compile: bool = False,
                       backend: str = "inductor", mode: str | None = None) -> None:
    """Choose how every backbone in ``model`` runs later decoding steps (default: the sliced step).

    ``compile`` (implies ``fixed_shape``) runs each step through ``torch.compile`` of
    :meth:`Backbone._fixed_shape_step`, with ``mode`` ``"reduce-overhead"`` on CUDA (CUDA graphs:
    one graph launch per step instead of ~15 kernels per layer) and the default mode elsewhere.
    The compiled step needs fixed shapes, so the cache keeps its rows when utterances finish (their
    rows are computed and dropped), attends over its whole allocated length under a mask, and
    rounds that length up to a multiple of :data:`FIXED_SHAPE_LENGTH_STEP`; each new (batch,
    length) shape compiles once. Its tensors are kept for the next call of that shape
    (:class:`CacheStore`: a few shapes' caches stay allocated between calls), so a CUDA graph
    recorded on them is replayed, not recorded again. Worth it where launches, not arithmetic, bound a step (a GPU at
    small batch); on a CPU it was no faster (docs/results.md). ``fixed_shape`` alone
    runs the same step eagerly (the reference the compiled one is tested against).
    """
    backbones = [m for m in model.modules() if isinstance(m, Backbone)]
    if not backbones:
        raise ValueError(f"{type(model).__name__} has no Backbone to configure")
    if compile:
        # each (batch, length, dtype, grad mode) combination compiles once; torch's default limit of 8
        # per function would, with fullgraph=True, end a long evaluation (length buckets x a smaller
        # last batch x the STT beam sizes) in a hard error at the 9th instead of compiling it
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for bb in backbones:
        bb.fixed_shape_decoding = fixed_shape or compile
        bb._compiled_step = None
        bb.compile_seconds, bb._compiled_shapes = 0.0, set()
        bb._cache_store = CacheStore()  # drop the kept tensors: the new setting may never use them
        if compile:
            device = next(bb.parameters()).device
            chosen = mode or ("reduce-overhead" if device.type == "cuda" else None)
            bb._compiled_step = torch.compile(bb._fixed_shape_step, backend=backend, mode=chosen,
                                              fullgraph=True, dynamic=False)


def decoding_compile_seconds(model: nn.Module) -> float:
    """Seconds ``model``'s backbones spent in first calls of their compiled step, one per new shape,
    since :func:`configure_decoding` (0.0 uncompiled): torch.compile's share of a decoding's time."""
    return sum(m.compile_seconds for m in model.modules() if isinstance(m, Backbone))
