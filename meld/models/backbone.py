"""The decoder-only Transformer shared by every system, with a preallocated KV cache.

attention -> MLP -> block -> Backbone. Pre-LayerNorm, sinusoidal absolute positions
(no length limit, so the max-length guard, not the model, bounds generation), causal
self-attention through ``F.scaled_dot_product_attention`` (flash kernels on GPU).

Batches may be left- or right-padded: ``key_valid`` (B, T) marks real positions, and
``positions`` (B, T) gives each real token its index inside its own sequence.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sinusoidal_positions(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, T) integer positions -> (B, T, dim) sinusoidal embeddings."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    angles = positions.to(torch.float32).unsqueeze(-1) * freqs  # (B, T, half)
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class KVCache:
    """Preallocated keys/values for every layer: (layers, B, heads, max_len, head_dim) each.

    ``length`` is the number of positions filled so far (shared by the batch: padded
    positions are masked through ``key_valid``). ``select(idx)`` keeps a subset of the
    batch, so finished sequences can leave a batched generation.
    """

    def __init__(self, n_layers: int, batch: int, n_heads: int, max_len: int, head_dim: int, device, dtype):
        shape = (n_layers, batch, n_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0
        self.max_len = max_len

    def select(self, idx: torch.Tensor) -> None:
        self.k = self.k[:, idx]
        self.v = self.v[:, idx]
        self.key_valid = self.key_valid[idx]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]


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
        self, x: torch.Tensor, key_valid: torch.Tensor | None, cache: KVCache | None, layer: int
    ) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        k = k.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        p = self.dropout if self.training else 0.0
        if cache is None:
            if key_valid is None:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
            else:
                causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
                mask = causal[None, None] & key_valid[:, None, None, :]  # (B, 1, T, T)
                # a padded query row with no valid key would give NaN: let it see itself
                mask = mask | torch.eye(T, dtype=torch.bool, device=x.device)[None, None]
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        else:
            start = cache.length
            end = start + T
            if end > cache.max_len:
                raise RuntimeError(f"KV cache overflow: {end} positions > max_len {cache.max_len}")
            cache.k[layer, :, :, start:end] = k
            cache.v[layer, :, :, start:end] = v
            keys, values = cache.k[layer, :, :, :end], cache.v[layer, :, :, :end]  # (B, H, end, Dh)
            valid = cache.key_valid[:, :end]
            q_pos = torch.arange(start, end, device=x.device)
            k_pos = torch.arange(end, device=x.device)
            mask = (k_pos[None, :] <= q_pos[:, None])[None, None] & valid[:, None, None, :]  # (B, 1, T, end)
            mask = mask | (k_pos[None, :] == q_pos[:, None])[None, None]
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff)
        self.out = nn.Linear(d_ff, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.out(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, d_ff, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, key_valid, cache, layer):
        x = x + self.drop(self.attn(self.ln1(x), key_valid, cache, layer))
        return x + self.mlp(self.ln2(x))


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

    def new_cache(self, batch: int, max_len: int, device=None, dtype=None) -> KVCache:
        p = next(self.parameters())
        return KVCache(
            self.n_layers, batch, self.n_heads, max_len, self.d_model // self.n_heads,
            device or p.device, dtype or p.dtype,
        )

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        key_valid: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Run the stack.

        Args:
            x: (B, T, D) input embeddings.
            positions: (B, T) position of each token in its own sequence; default 0..T-1 (+ cache length).
            key_valid: (B, T) True for real tokens; default all real.
            cache: when given, ``x`` continues the cached prefix and the cache is extended in place.

        Returns:
            (B, T, D) final hidden states (after the last LayerNorm).
        """
        B, T, _ = x.shape
        offset = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(offset, offset + T, device=x.device).expand(B, T)
        if cache is not None:
            valid = key_valid if key_valid is not None else torch.ones(B, T, dtype=torch.bool, device=x.device)
            cache.key_valid[:, offset : offset + T] = valid
        h = self.drop(x + sinusoidal_positions(positions, self.d_model).to(x.dtype))
        for i, block in enumerate(self.blocks):
            h = block(h, key_valid, cache, i)
        if cache is not None:
            cache.length = offset + T
        return self.ln_f(h)
