"""Layers shared by the mel systems: the mel encoder (prenet), the convolutional postnet,
the STT convolutional front end, SpecAugment, and frame grouping for the reduction factor."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MelEncoder(nn.Module):
    """E: a 3-layer ReLU MLP with dropout, embedding mel frames (and codewords) into the model width.

    Its dropout can be forced on outside training: MELD keeps it on at TTS inference
    (test-time dropout, which keeps generation from collapsing into repeated frames), and
    forces it off for STT inputs.
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int, dropout: float, n_layers: int = 3):
        super().__init__()
        dims = [in_dim] + [hidden] * (n_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.dropout = dropout

    def forward(self, x: torch.Tensor, dropout: bool | None = None) -> torch.Tensor:
        """x: (..., in_dim) -> (..., out_dim); ``dropout`` None means 'only while training'."""
        active = self.training if dropout is None else dropout
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
            if active and self.dropout > 0:
                x = keep_mask_dropout(x, self.dropout)
        return x


def keep_mask_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout, as ``F.dropout(x, p, training=True)``, with the keep mask drawn as ``rand >= p``.

    The same Bernoulli(1 - p) keep mask and 1/(1 - p) scaling, from the same global generator,
    but 2-3x faster on CPU than ``F.dropout``'s ``bernoulli_``: MELD keeps this dropout on at
    inference, so it runs at every decoding step (a tenth of a batch-16 step; bench/generation.py).
    """
    if p >= 1.0:
        return torch.zeros_like(x)
    # the mask made in place in float (1/(1-p) or 0): no bool tensor to promote, one product with x;
    # bit-identical to ``x * (rand >= p) * scale`` and ~25 % cheaper at decoding sizes
    return x * torch.rand_like(x).ge_(p).mul_(1.0 / (1.0 - p))


def masked_frame_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, T, D) ``values`` over the real frames of (B, T) bool ``mask`` and all D channels,
    in float32 whatever the values' dtype (under bf16 autocast a bf16 sum or frame count above 256
    would round)."""
    m = mask[..., None]
    total = torch.where(m, values.float(), torch.zeros((), device=values.device)).sum()
    return total / (mask.sum().clamp_min(1) * values.shape[-1])


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` over (B, C, T) whose training statistics count only real frames.

    With a (B, 1, T) ``keep`` mask in training mode the batch mean and variance (and the running
    estimates inference uses) come from the frames where keep is 1, so how much padding a batch has
    changes neither its real frames' outputs nor the running statistics. Otherwise, plain batch norm.
    Same parameters and buffers as ``nn.BatchNorm1d``: checkpoints load either way.
    """

    def forward(self, y: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        if keep is None or not self.training:
            return super().forward(y)
        # statistics in float32: under bf16 autocast a bf16 frame count or sum above 256 would round
        dtype, y, keep = y.dtype, y.float(), keep.float()
        n = keep.sum()  # real frames in the batch
        mean = (y * keep).sum((0, 2)) / n  # (C,)
        var = (((y - mean[None, :, None]) * keep) ** 2).sum((0, 2)) / n  # biased, as batch norm normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * n / (n - 1).clamp_min(1)  # what nn.BatchNorm1d keeps
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), momentum)
        y_hat = (y - mean[None, :, None]) * torch.rsqrt(var[None, :, None] + self.eps)
        if self.affine:
            y_hat = y_hat * self.weight[None, :, None] + self.bias[None, :, None]
        return y_hat.to(dtype)


class Postnet(nn.Module):
    """Tacotron-2 postnet: conv1d stack (batch norm, tanh except the last) predicting a residual.

    Args:
        dim: frame dimension (80 * reduction factor).
        channels: filters per layer (paper: 512).
        kernel: kernel size (paper: 5).
        n_layers: conv layers (Tacotron 2: 5).
        dropout: dropout after each layer (Tacotron 2: 0.5).
    """

    def __init__(self, dim: int, channels: int, kernel: int, n_layers: int, dropout: float):
        super().__init__()
        dims = [dim] + [channels] * (n_layers - 1) + [dim]
        self.convs = nn.ModuleList(
            nn.Sequential(nn.Conv1d(a, b, kernel, padding=kernel // 2), MaskedBatchNorm1d(b))
            for a, b in zip(dims[:-1], dims[1:])
        )
        self.dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, dim) pre-net prediction, mask: (B, T) real frames -> (B, T, dim) refined prediction
        (x + residual).

        Padded frames are zeroed before every conv, so a real frame's output is the one it would get
        from its utterance alone (the convs' own zero padding): a padded batch and per-utterance
        calls agree to float rounding. In training, batch norm's statistics are taken over the real
        frames only (:class:`MaskedBatchNorm1d`), so padding does not shift them either.
        """
        y = x.transpose(1, 2)  # (B, dim, T)
        keep = None if mask is None else mask[:, None, :].to(y.dtype)
        for i, (conv, norm) in enumerate(self.convs):
            y = norm(conv(y if keep is None else y * keep), keep)
            if i < len(self.convs) - 1:
                y = torch.tanh(y)
            y = F.dropout(y, self.dropout, training=self.training)
        return x + y.transpose(1, 2)

    def refine_each(self, frames: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-utterance (T_i, dim) frames -> the same after the postnet, in one padded batch.

        A generation's utterances end at different steps; one masked call replaces one call per
        utterance (5 convs each: 80 small kernels at batch 16, 5 in all). Empty ones stay empty.
        In training mode batch norm normalises by the batch's own statistics, which other utterances
        would change, so there each utterance runs alone, as it would be generated alone.
        """
        if not frames:
            return []
        if self.training:
            return [self.forward(f[None])[0] if f.shape[0] else f.clone() for f in frames]
        lengths = [f.shape[0] for f in frames]
        if max(lengths) == 0:
            return [f.clone() for f in frames]
        x = torch.nn.utils.rnn.pad_sequence(frames, batch_first=True)  # (B, T_max, dim), zero padded
        mask = torch.arange(x.shape[1], device=x.device)[None, :] < x.new_tensor(lengths, dtype=torch.long)[:, None]
        y = self.forward(x, mask)
        return [y[i, :n] for i, n in enumerate(lengths)]


class ConvFrontEnd(nn.Module):
    """Residual 1-D convolutions over time on embedded frames (pre-LayerNorm, GELU).

    Each frame state mixes its ``kernel // 2`` neighbours on both sides before the Transformer, the
    locality a Transformer over raw frames otherwise has to discover by itself. Non-causal, so only for
    input that is given whole (STT's audio). Padded frames are zeroed before every layer so they never
    leak into real ones.

    Args:
        dim: model width; n_layers: residual conv layers; kernel: odd kernel size.
    """

    def __init__(self, dim: int, n_layers: int, kernel: int = 5):
        super().__init__()
        if kernel % 2 == 0:
            raise ValueError(f"the front end's kernel must be odd (got {kernel}): it is centred on each frame")
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(n_layers))
        self.convs = nn.ModuleList(nn.Conv1d(dim, dim, kernel, padding=kernel // 2) for _ in range(n_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: (B, T, dim) frame embeddings, mask: (B, T) real frames -> (B, T, dim)."""
        keep = mask[..., None].to(x.dtype)
        for norm, conv in zip(self.norms, self.convs):
            y = (norm(x) * keep).transpose(1, 2)  # (B, dim, T)
            x = x + F.gelu(conv(y)).transpose(1, 2)
        return x * keep


def group_frames(mel: torch.Tensor, reduction: int) -> torch.Tensor:
    """(B, T, 80) -> (B, ceil(T/r), 80*r): concatenate r consecutive frames (zero-padded at the end)."""
    if reduction == 1:
        return mel
    B, T, C = mel.shape
    pad = (-T) % reduction
    if pad:
        mel = F.pad(mel, (0, 0, 0, pad))
    return mel.reshape(B, (T + pad) // reduction, C * reduction)


def ungroup_frames(mel: torch.Tensor, reduction: int, n_mels: int = 80) -> torch.Tensor:
    """(B, T', 80*r) -> (B, T'*r, 80): inverse of :func:`group_frames` (padding kept)."""
    if reduction == 1:
        return mel
    B, T, _ = mel.shape
    return mel.reshape(B, T * reduction, n_mels)


def spec_augment(
    mel: torch.Tensor,
    lengths: torch.Tensor,
    *,
    freq_masks: int,
    freq_width: int,
    time_masks: int,
    time_width: int,
    max_time_fraction: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """SpecAugment (zero masks in normalised space) on (B, T, C) frames; returns a new tensor.

    Each utterance gets ``freq_masks`` bands of up to ``freq_width`` channels and
    ``time_masks`` spans of up to ``min(time_width, max_time_fraction * length)`` frames.
    """
    out = mel.clone()
    B, T, C = mel.shape
    draw = _draw_device(generator)
    for b in range(B):
        n = int(lengths[b])
        for _ in range(freq_masks):
            w = int(torch.randint(0, freq_width + 1, (1,), generator=generator, device=draw))
            if w:
                f0 = int(torch.randint(0, max(1, C - w + 1), (1,), generator=generator, device=draw))
                out[b, :n, f0 : f0 + w] = 0.0
        cap = min(time_width, int(max_time_fraction * n))
        for _ in range(time_masks):
            w = int(torch.randint(0, cap + 1, (1,), generator=generator, device=draw)) if cap > 0 else 0
            if w:
                t0 = int(torch.randint(0, max(1, n - w + 1), (1,), generator=generator, device=draw))
                out[b, t0 : t0 + w] = 0.0
    return out


def voice_perturb(
    mel: torch.Tensor,
    lengths: torch.Tensor,
    *,
    max_warp: float,
    max_speed: float,
    max_tilt: float,
    length_multiple: int = 1,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random voice and tempo changes on (B, T, C) log-mel frames; returns new frames and lengths.

    The mini corpus trains on few recorded people (kal, rms, slt), so an STT model meets a new
    person's formants and tempo for the first time at ``test_unseen``. Per utterance:

    - frequency warp (VTLP-style, on the mel-channel axis): channel ``c`` reads channel
      ``c * a`` (linear interpolation, clamped), ``a ~ U(1 - max_warp, 1 + max_warp)``;
      shifting formants as a longer or shorter vocal tract would;
    - spectral tilt: ``t * (c / (C - 1) - 0.5)`` added, ``t ~ U(-max_tilt, max_tilt)`` in the
      frames' own units: a brighter or duller voice or channel;
    - tempo: frames resampled in time by ``s ~ U(1 - max_speed, 1 + max_speed)`` (the new length
      is ``round(n / s)``, rounded down to a multiple of ``length_multiple``, at least one), pitch
      and spectrum kept.

    All zero: frames and lengths come back unchanged. Padding in the output is zero.
    """
    check_voice_perturb(max_warp, max_speed, max_tilt)
    if max_warp == max_speed == max_tilt == 0.0:
        return mel, lengths
    B, T, C = mel.shape

    def uniform(half_width: float) -> float:
        return float((torch.rand((), generator=generator, device=_draw_device(generator)) * 2 - 1) * half_width)

    channels = torch.arange(C, dtype=mel.dtype, device=mel.device)
    rows, new_lengths = [], []
    for b in range(B):
        x = mel[b, : int(lengths[b])]
        warp, tilt, speed = 1.0 + uniform(max_warp), uniform(max_tilt), 1.0 + uniform(max_speed)
        if max_warp:
            x = _interpolate_rows(x.T, (channels * warp).clamp(max=C - 1)).T
        if max_tilt:
            x = x + tilt * (channels / (C - 1) - 0.5)
        if max_speed and x.shape[0] > 1:
            n = max(length_multiple, round(x.shape[0] / speed) // length_multiple * length_multiple)
            x = _interpolate_rows(x, (torch.arange(n, dtype=mel.dtype, device=mel.device) * speed).clamp(max=x.shape[0] - 1))
        rows.append(x)
        new_lengths.append(x.shape[0])
    out = mel.new_zeros(B, max(new_lengths), C)
    for b, x in enumerate(rows):
        out[b, : x.shape[0]] = x
    return out, torch.tensor(new_lengths, dtype=lengths.dtype, device=lengths.device)


def _draw_device(generator: torch.Generator | None) -> torch.device | None:
    """Where random numbers from ``generator`` must be drawn: a generator only draws on its own device
    (a model's CUDA generator, which q(z|x) samples with, refuses a CPU draw); None: the default."""
    return generator.device if generator is not None else None


def check_voice_perturb(max_warp: float, max_speed: float, max_tilt: float) -> None:
    """Refuse ranges :func:`voice_perturb` cannot use, naming the setting."""
    for name, value, upper in (("stt_voice_warp", max_warp, 1.0), ("stt_speed_perturb", max_speed, 1.0),
                               ("stt_spectral_tilt", max_tilt, float("inf"))):
        if not 0.0 <= value < upper:
            raise ValueError(f"{name} must be in [0, {upper:g}), got {value!r}")


def _interpolate_rows(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` (N, D) read at fractional ``positions`` (M,) in [0, N-1], linearly: (M, D)."""
    lo = positions.floor().long()
    hi = (lo + 1).clamp(max=x.shape[0] - 1)
    w = (positions - lo.to(positions.dtype)).unsqueeze(1)
    return x[lo] * (1 - w) + x[hi] * w


def check_finite_frames(frames: torch.Tensor, what: str) -> None:
    """Refuse frames holding NaN or infinity, naming the rows (one host read).

    A decoding loop fed such frames fails far from the cause or not at all: Mel-LM and MELLE
    continue the prompt with NaN frames up to the length guard, and dMel's bins of NaN are indices
    out of its embedding table (a device-side assert on a GPU). The padding beyond a row's length
    counts too: attention gives a masked key weight 0, but 0 * NaN is NaN, so it would spread.

    Args:
        frames: (B, T, D) normalised frames, padding included.
        what: names the input in the message, e.g. ``"MelLM.generate: prompt"``.

    Raises:
        ValueError: some row is not all finite.
    """
    bad = (~torch.isfinite(frames)).flatten(1).any(-1).tolist()  # (B,)
    if any(bad):
        rows = [i for i, b in enumerate(bad) if b]
        raise ValueError(f"{what}: row(s) {rows} of the batch hold NaN or infinite values (padding included)")


def check_lengths(what: str, name: str, lengths: torch.Tensor, batch: int, size: int) -> None:
    """Refuse per-row ``lengths`` that do not fit their (batch, size, ...) tensor, naming the first bad row.

    Outside [0, size] a decoding loop fails far from the cause or not at all: a prompt length past the
    prompt was an IndexError in the backbone's prefill, a negative one continued from a text token's
    hidden state, and a text length past the text read its padding as text. One host read per call.
    """
    if lengths.dim() != 1 or lengths.shape[0] != batch:
        raise ValueError(f"{what}: {name} has {lengths.shape[0] if lengths.dim() else 0} entries for a batch of {batch}"
                         f" (shape {tuple(lengths.shape)})")
    for row, n in enumerate(lengths.tolist()):
        if not 0 <= n <= size:
            raise ValueError(f"{what}: {name}[{row}] = {n} is outside [0, {size}] (its tensor's length)")


def check_continuation_lengths(what: str, text: torch.Tensor, text_len: torch.Tensor, prompt: torch.Tensor,
                               prompt_len: torch.Tensor) -> None:
    """A TTS continuation's inputs agree: as many text rows as prompt rows, and each row's text and
    prompt lengths within their tensors (:func:`check_lengths`)."""
    B = prompt.shape[0]
    if text.shape[0] != B:
        raise ValueError(f"{what}: text has {text.shape[0]} rows and prompt {B}")
    check_lengths(what, "text_len", text_len, B, text.shape[1])
    check_lengths(what, "prompt_len", prompt_len, B, prompt.shape[1])
