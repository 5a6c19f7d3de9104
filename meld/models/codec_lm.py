"""Codec-LM (VALL-E-like baseline): 12-level DAC codes with a one-step delay pattern, 12 heads.

Sequence: ``[BPE text] <TTS> D_0 ... D_{T+K-2}`` -> predicts ``D_0 ... D_{T+K-1}`` where ``D`` is the
delayed code grid (K levels, level k shifted by k steps)::

    D[s, k] = codes[s - k, k]   if 0 <= s - k < T
            = <EOS>             if s - k >= T      (each level's stream ends with <EOS>)
            = <EMPTY>           if s - k < 0       (input only: nothing yet at this level)

At step s head k predicts frame s - k of level k having seen every level of the earlier frames
and the levels < k of the same frame. A delayed step enters the Transformer as the sum of the
K level embeddings and leaves it through K heads over ``codebook_size + 1`` classes (codes and
``<EOS>``). Training targets are each level's T codes and its first ``<EOS>``.

Generation stops an utterance when any head emits ``<EOS>`` (the end frame is the earliest
frame at which a head said ``<EOS>``); the higher levels then finish the frames before the end
(K - 1 more steps at most, the delay pattern's tail), forced to ``<EOS>`` past it.

Also here: :class:`DACCodec`, the Descript Audio Codec (Kumar et al. 2023) architecture, written
for this toolkit with the parameter names of the ``descript-audio-codec`` package, so its released
16 kHz weights (``weights_16khz.pth``: 12 codebooks of 1024, hop 320, i.e. 50 codes/s) load
from a local file; offline it is randomly initialised. The package itself can't be imported
here: it needs torchaudio, whose PyPI wheels are CUDA builds that don't load against a CPU torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from meld.models.backbone import Backbone, lengths_to_mask, packed_positions, prepare_for_decoding
from meld.models.builders import backbone_kwargs
from meld.models.layers import check_continuation_lengths
from meld.models.leaving_rows import LeavingRows, row_guards
from meld.models.meld import Generation
from meld.models.vocab import UnionEmbedding, UnionVocab
from meld.sampling import sample
from meld.weights import check_fits, first_line, read_weights, tensor_state

DAC_FRAME_RATE = 50.0  # codes per second of DAC's 16 kHz model (hop 2*4*5*8 = 320 samples)


# ---------------------------------------------------------------------- delay pattern
def delay_codes(codes: torch.Tensor, codes_len: torch.Tensor, *, eos: int, empty: int) -> torch.Tensor:
    """(B, T, K) codes -> (B, T+K, K) delayed grid: ``D[b, s, k] = codes[b, s-k, k]``, <EMPTY> before, <EOS> after."""
    B, T, K = codes.shape
    s = torch.arange(T + K, device=codes.device)[:, None]
    frame = s - torch.arange(K, device=codes.device)[None, :]  # (T+K, K) frame each entry belongs to
    src = (
        codes.gather(1, frame.clamp(0, max(T - 1, 0)).expand(B, -1, -1))
        if T
        else codes.new_zeros(B, T + K, K)
    )
    out = torch.where(frame[None] >= codes_len[:, None, None], torch.full_like(src, eos), src)
    return torch.where(frame[None] < 0, torch.full_like(out, empty), out)


def undelay_codes(delayed: torch.Tensor, n_frames: int) -> torch.Tensor:
    """(B, S, K) delayed grid -> (B, n_frames, K): ``codes[b, t, k] = D[b, t+k, k]`` (needs S >= n_frames + K - 1)."""
    B, S, K = delayed.shape
    idx = (
        torch.arange(n_frames, device=delayed.device)[:, None]
        + torch.arange(K, device=delayed.device)[None, :]
    )
    return delayed.gather(1, idx.expand(B, -1, -1))


class LevelEmbedding(nn.Module):
    """Sum of K per-level embeddings: (..., K) level tokens in [0, n_tokens) -> (..., d).

    One table of ``K * n_tokens`` rows summed by ``embedding_bag``; rows start at std ``1/sqrt(K)``.
    """

    def __init__(self, n_levels: int, n_tokens: int, d_model: int):
        super().__init__()
        self.n_levels = n_levels
        self.weight = nn.Parameter(torch.randn(n_levels * n_tokens, d_model) / n_levels**0.5)
        self.register_buffer("offsets", torch.arange(n_levels) * n_tokens, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        lead = tokens.shape[:-1]
        flat = (tokens + self.offsets).reshape(-1, self.n_levels)  # (N, K)
        return F.embedding_bag(flat, self.weight, mode="sum").reshape(*lead, self.weight.shape[1])


@dataclass
class CodecTTSOutput:
    logits: torch.Tensor  # (B, T+K, K, N+1) step s, head k predicts D[s, k] (frame s-k of level k)
    targets: torch.Tensor  # (B, T+K, K) delayed targets, -100 where not trained (s-k < 0 or s-k > T_b)


class CodecLM(nn.Module):
    """The Codec-LM system.

    Args:
        n_text: BPE vocabulary size.
        n_levels: codec levels K (DAC 16 kHz: 12).
        codebook_size: codes per level N (DAC: 1024). Head classes: N codes + <EOS> (index N);
            input tokens add <EMPTY> (index N+1).
        d_model, n_layers, n_heads, d_ff, dropout: backbone.
    """

    system = "codec_lm"

    def __init__(
        self,
        *,
        n_text: int,
        n_levels: int,
        codebook_size: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        d_ff: int,
        dropout: float,
    ):
        super().__init__()
        self.vocab = UnionVocab(n_text=n_text, n_codes=0)
        self.n_levels, self.codebook_size = n_levels, codebook_size
        self.eos, self.empty = codebook_size, codebook_size + 1
        self.token_emb = UnionEmbedding(self.vocab, d_model)
        self.level_emb = LevelEmbedding(n_levels, codebook_size + 2, d_model)
        self.backbone = Backbone(d_model, n_layers, n_heads, d_ff, dropout)
        self.head = nn.Linear(d_model, n_levels * (codebook_size + 1))

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h).unflatten(-1, (self.n_levels, self.codebook_size + 1))  # (..., K, N+1)

    # ------------------------------------------------------------------ training
    def forward_tts(
        self, text: torch.Tensor, text_len: torch.Tensor, codes: torch.Tensor, codes_len: torch.Tensor
    ) -> CodecTTSOutput:
        """Teacher-forced pass; codes (B, T, K) int64 in [0, N), codes_len (B,) real frames."""
        B, T, K = codes.shape
        L = text.shape[1]
        delayed = delay_codes(codes, codes_len, eos=self.eos, empty=self.empty)  # (B, T+K, K)
        step_valid = lengths_to_mask(codes_len + K - 1, T + K - 1)  # inputs D_0 .. D_{T_b+K-2}
        x, valid = self.token_emb.tts_sequence(text, text_len, self.level_emb(delayed[:, : T + K - 1]),
                                               step_valid)  # (B, L+T+K, d)
        h = self.backbone(x, packed_positions(valid), valid)[:, L:]  # (B, T+K, d)
        frame = (
            torch.arange(T + K, device=codes.device)[:, None] - torch.arange(K, device=codes.device)[None, :]
        )
        trained = (frame[None] >= 0) & (frame[None] <= codes_len[:, None, None])  # codes and the first <EOS>
        return CodecTTSOutput(self._logits(h), delayed.masked_fill(~trained, -100))

    def uses_every_parameter(self, task: str) -> bool:
        """Whether a ``task`` batch's loss reaches every parameter: always (TTS is its only task)."""
        return True

    def compute_losses(
        self, batch: dict, task: str = "tts", generator: torch.Generator | None = None
    ) -> dict:
        """``loss/ce_codes``: mean cross-entropy over every level's codes and <EOS> (unweighted).

        Batch: codes (B, T, K) int64, codes_len (B,), text (B, L), text_len (B,). TTS only.
        """
        if task != "tts":
            raise ValueError(f"Codec-LM is a TTS system; task {task!r} is not supported")
        out = self.forward_tts(batch["text"], batch["text_len"], batch["codes"], batch["codes_len"])
        ce = F.cross_entropy(out.logits.flatten(0, 2).float(), out.targets.flatten(), ignore_index=-100)
        return {"loss/ce_codes": ce}

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def generate(
        self,
        text: torch.Tensor,
        text_len: torch.Tensor,
        prompt_codes: torch.Tensor,
        prompt_len: torch.Tensor,
        *,
        max_frames: int | Sequence[int],
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty_value: float = 1.0,
        test_time_dropout: bool = True,
        zero_latent: bool = False,
        generator: torch.Generator | None = None,
        kv_cache_dtype: torch.dtype | None = None,
    ) -> Generation:
        """Zero-shot TTS continuation of code prompts, batched and KV-cached.

        Args:
            text: (B, L) BPE ids of the full transcript; text_len: (B,).
            prompt_codes: (B, P, K) int64 undelayed codes of the prompts; prompt_len: (B,) (0 allowed).
            max_frames: guard on generated code frames, one for all or one per utterance (each stops
                at its own, as it would alone).
            temperature, top_k, top_p: sampling per level (over N codes + <EOS>).
            repetition_penalty_value, test_time_dropout, zero_latent: MELD-only; accepted and ignored.
            kv_cache_dtype: the KV cache's dtype (None: the weights'; ``backbone.check_cache_dtype``).

        Returns:
            Generation with frames = (T_i, K) int64 undelayed codes after the prompt, and codes =
            the level-0 codes of each utterance.

        Raises:
            ValueError: a length does not fit its tensor (``layers.check_lengths``).
        """
        check_continuation_lengths("CodecLM.generate", text, text_len, prompt_codes, prompt_len)
        prepare_for_decoding(self)
        B, P, K = prompt_codes.shape
        max_frames, limits, _ = row_guards(max_frames, B)
        L = text.shape[1]
        device = prompt_codes.device
        rows = torch.arange(B, device=device)
        levels = torch.arange(K, device=device)
        delayed_prompt = delay_codes(prompt_codes, prompt_len, eos=self.eos, empty=self.empty)  # (B, P+K, K)
        x, valid = self.token_emb.tts_sequence(text, text_len, self.level_emb(delayed_prompt[:, :P]),
                                               lengths_to_mask(prompt_len, P))
        last = L + prompt_len  # each sequence's last real token (<TTS> when P_b == 0)
        # room for the delay pattern's tail: up to K - 1 steps after the last frame
        h_last, cache, next_pos = self.backbone.prefill(x, valid, last, max_frames + K, cache_dtype=kv_cache_dtype)  # (B, d), cache, (B,)

        # per active row: its delayed step s = P_b + g, the prompt length, the end frame (exclusive)
        active, plen = rows.clone(), prompt_len.clone()
        end = prompt_len + torch.tensor(limits, device=device)  # each row's guard, until some head says <EOS>
        stopped = torch.zeros(B, dtype=torch.bool, device=device)
        # each row's chosen (K,) tokens from s = P_b on
        rows = LeavingRows(steps=torch.empty(B, max(max_frames + K, 0), K, dtype=torch.long, device=device))
        ends = [0] * B
        hit_max = [False] * B
        for g in range(max_frames + K):
            frame = plen[:, None] + g - levels[None, :]  # (b, K) frame index each head speaks for
            logits = self._logits(h_last)  # (b, K, N+1)
            b = logits.shape[0]
            sampled = sample(
                logits.reshape(b * K, -1),
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                generator=generator,
            ).view(b, K)
            known = frame < plen[:, None]  # prompt frames (and the <EMPTY> corner) are not sampled
            free_eos = (sampled == self.eos) & ~known & (frame < end[:, None])
            never = torch.full_like(frame, torch.iinfo(frame.dtype).max)
            new_end = torch.where(free_eos, frame, never).amin(-1)  # earliest frame a head ended
            stopped = stopped | (new_end < end)
            end = torch.minimum(end, new_end)
            prompt_tok = (
                prompt_codes[active[:, None], frame.clamp(0, max(P - 1, 0)), levels[None, :]]
                if P
                else sampled
            )
            chosen = torch.where(frame >= end[:, None], torch.full_like(sampled, self.eos), sampled)
            chosen = torch.where(known, prompt_tok, chosen)
            chosen = torch.where(frame < 0, torch.full_like(sampled, self.empty), chosen)
            # done once the last level has passed the last real frame that still needed generating
            done = torch.maximum(plen + g - K + 2, plen) >= end
            rows.write(g, steps=chosen)
            done_rows = done.tolist()  # the one host sync per step: the stop check
            if any(done_rows):  # rows finish: read their ends too (only on a step where some finish)
                end_rows, stopped_rows = end.tolist(), stopped.tolist()
                for row, i in enumerate(rows.rows_of):
                    if done_rows[row]:
                        ends[i], hit_max[i] = end_rows[row], not stopped_rows[row]
                idx = rows.leave(done_rows, g + 1)
                if idx is None:
                    break
                active, plen, end, stopped = active[idx], plen[idx], end[idx], stopped[idx]
                chosen, next_pos = chosen[idx], next_pos[idx]
                cache.select(idx)
            h_last = self.backbone.step(self.level_emb(chosen), next_pos, cache)
            next_pos = next_pos + 1

        frames, level0 = [], []
        for i, p_i in enumerate(prompt_len.tolist()):
            n = max(ends[i] - p_i, 0)
            if n:
                grid = rows.outputs["steps"][i][None]  # (1, G, K) delayed steps from s = P_i
                grid = F.pad(grid, (0, 0, 0, max(0, n + K - 1 - grid.shape[1])), value=self.eos)
                codes = undelay_codes(grid, n)[0]  # (n, K)
            else:
                codes = prompt_codes.new_zeros(0, K)
            frames.append(codes)
            level0.append(codes[:, 0].tolist())
        return Generation(frames, hit_max, level0)


def codec_lm_kwargs(
    model_cfg, *, n_text: int, n_levels: int = 12, codebook_size: int = 1024
) -> dict[str, Any]:
    """Constructor kwargs of :class:`CodecLM` from a ModelConfig section (DAC 16 kHz: 12 levels of 1024)."""
    return dict(n_text=n_text, n_levels=n_levels, codebook_size=codebook_size, **backbone_kwargs(model_cfg))


# ---------------------------------------------------------------------- the codec (DAC architecture)
class _WeightNormConv(nn.Module):
    """Conv1d / ConvTranspose1d with weight normalisation stored as ``weight_g`` and ``weight_v``.

    ``weight = weight_g * weight_v / ||weight_v||`` (norm over all but the first dimension), the
    parameter layout of ``torch.nn.utils.weight_norm`` that DAC's released weights use.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int,
        *,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        transpose: bool = False,
    ):
        super().__init__()
        self.transpose, self.stride, self.padding, self.dilation = transpose, stride, padding, dilation
        shape = (c_in, c_out, kernel) if transpose else (c_out, c_in, kernel)
        v = torch.empty(shape)
        nn.init.kaiming_uniform_(v, a=math.sqrt(5))
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(v.flatten(1).norm(dim=1).view(-1, 1, 1).clone())
        self.bias = nn.Parameter(torch.zeros(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.weight_v
        w = self.weight_g * v / v.flatten(1).norm(dim=1).view(-1, 1, 1)
        if self.transpose:
            return F.conv_transpose1d(x, w, self.bias, self.stride, self.padding, dilation=self.dilation)
        return F.conv1d(x, w, self.bias, self.stride, self.padding, self.dilation)


class _Snake(nn.Module):
    """Snake activation x + sin^2(alpha x) / alpha, one alpha per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (self.alpha + 1e-9).reciprocal() * torch.sin(self.alpha * x).pow(2)


class _ResidualUnit(nn.Module):
    def __init__(self, dim: int, dilation: int):
        super().__init__()
        self.block = nn.Sequential(
            _Snake(dim),
            _WeightNormConv(dim, dim, 7, dilation=dilation, padding=3 * dilation),
            _Snake(dim),
            _WeightNormConv(dim, dim, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        crop = (x.shape[-1] - y.shape[-1]) // 2
        return (x[..., crop : x.shape[-1] - crop] if crop > 0 else x) + y


class _Encoder(nn.Module):
    """Waveform (B, 1, N) -> latents (B, latent, N / hop); parameter names ``encoder.block.<i>``."""

    def __init__(self, dim: int, rates: list[int], latent: int):
        super().__init__()
        layers: list[nn.Module] = [_WeightNormConv(1, dim, 7, padding=3)]
        for stride in rates:  # each block doubles the channels and downsamples by its stride
            layers.append(_EncoderBlock(dim * 2, stride))
            dim *= 2
        layers += [_Snake(dim), _WeightNormConv(dim, latent, 3, padding=1)]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class _EncoderBlock(nn.Module):
    def __init__(self, dim: int, stride: int):
        super().__init__()
        half = dim // 2
        self.block = nn.Sequential(
            _ResidualUnit(half, 1),
            _ResidualUnit(half, 3),
            _ResidualUnit(half, 9),
            _Snake(half),
            _WeightNormConv(half, dim, 2 * stride, stride=stride, padding=math.ceil(stride / 2)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class _DecoderBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.block = nn.Sequential(
            _Snake(c_in),
            _WeightNormConv(
                c_in, c_out, 2 * stride, stride=stride, padding=math.ceil(stride / 2), transpose=True
            ),
            _ResidualUnit(c_out, 1),
            _ResidualUnit(c_out, 3),
            _ResidualUnit(c_out, 9),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class _Decoder(nn.Module):
    """Latents (B, latent, T) -> waveform (B, 1, ~T * hop) in [-1, 1]; parameter names ``decoder.model.<i>``."""

    def __init__(self, latent: int, dim: int, rates: list[int]):
        super().__init__()
        layers: list[nn.Module] = [_WeightNormConv(latent, dim, 7, padding=3)]
        c_out = dim
        for i, stride in enumerate(rates):  # each block halves the channels and upsamples by its stride
            c_out = dim // 2 ** (i + 1)
            layers.append(_DecoderBlock(dim // 2**i, c_out, stride))
        layers += [_Snake(c_out), _WeightNormConv(c_out, 1, 7, padding=3), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model(z)


class _ResidualVQ(nn.Module):
    """K quantizers, each coding what the previous ones left; parameter names ``quantizer.quantizers.<k>``."""

    def __init__(self, dim: int, n_codebooks: int, codebook_size: int, codebook_dim: int):
        super().__init__()
        self.quantizers = nn.ModuleList(
            _Quantizer(dim, codebook_size, codebook_dim) for _ in range(n_codebooks)
        )

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, T) latents -> (B, T, K) codes."""
        codes = []
        for q in self.quantizers:
            c = q.encode(z)  # (B, T)
            z = z - q.decode(c)
            codes.append(c)
        return torch.stack(codes, dim=-1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, T, K) codes -> (B, D, T) quantised latents (sum of the levels' contributions)."""
        return sum(q.decode(codes[..., k]) for k, q in enumerate(self.quantizers))


class _Quantizer(nn.Module):
    """One factorised, l2-normalised VQ level: project to ``codebook_dim``, nearest code by cosine."""

    def __init__(self, dim: int, codebook_size: int, codebook_dim: int):
        super().__init__()
        self.in_proj = _WeightNormConv(dim, codebook_dim, 1)
        self.out_proj = _WeightNormConv(codebook_dim, dim, 1)
        self.codebook = nn.Embedding(codebook_size, codebook_dim)

    def encode(self, residual: torch.Tensor) -> torch.Tensor:
        """(B, D, T) -> (B, T) code indices."""
        z = F.normalize(self.in_proj(residual).transpose(1, 2), dim=-1)  # (B, T, c)
        book = F.normalize(self.codebook.weight, dim=-1)  # (N, c)
        return (z @ book.t()).argmax(-1)  # nearest unit vector = largest cosine

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, D, T) this level's contribution."""
        return self.out_proj(self.codebook(codes).transpose(1, 2))


class DACCodec(nn.Module):
    """Descript Audio Codec: conv encoder -> residual VQ (K levels of N codes) -> conv decoder.

    Defaults are DAC's 16 kHz model (12 x 1024 codes, hop 320 samples = 50 Hz, ~74M parameters).
    ``DACCodec.load(path)`` reads a released ``weights_16khz.pth`` (or any state dict of this
    layout); ``DACCodec(**small_kwargs)`` gives a randomly initialised codec for offline tests.

    Args:
        encoder_dim: channels of the first encoder conv (doubled by each block).
        encoder_rates: encoder strides; their product is the hop.
        latent_dim: latent width (default ``encoder_dim * 2**len(encoder_rates)``).
        decoder_dim: channels of the first decoder conv (halved by each block).
        decoder_rates: decoder strides.
        n_codebooks, codebook_size, codebook_dim: the residual VQ.
        sample_rate: audio rate the codec works at.
    """

    def __init__(
        self,
        *,
        encoder_dim: int = 64,
        encoder_rates: tuple[int, ...] = (2, 4, 5, 8),
        latent_dim: int | None = None,
        decoder_dim: int = 1536,
        decoder_rates: tuple[int, ...] = (8, 5, 4, 2),
        n_codebooks: int = 12,
        codebook_size: int = 1024,
        codebook_dim: int = 8,
        sample_rate: int = 16_000,
    ):
        super().__init__()
        latent_dim = latent_dim or encoder_dim * 2 ** len(encoder_rates)
        self.sample_rate, self.n_codebooks, self.codebook_size = sample_rate, n_codebooks, codebook_size
        self.hop_length = math.prod(encoder_rates)
        self.encoder = _Encoder(encoder_dim, list(encoder_rates), latent_dim)
        self.quantizer = _ResidualVQ(latent_dim, n_codebooks, codebook_size, codebook_dim)
        self.decoder = _Decoder(latent_dim, decoder_dim, list(decoder_rates))

    @property
    def _device(self) -> torch.device:
        return self.encoder.block[0].weight_v.device

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length

    @classmethod
    def load(cls, path: str | Path, **overrides) -> DACCodec:
        """Real weights from a local file, without executing code (``weights_only=True``).

        Accepts DAC's release format ``{"state_dict": ..., "metadata": {"kwargs": {...}}}`` (the
        architecture comes from the metadata) or a bare state dict (architecture from ``overrides``).

        Raises:
            ValueError: one line naming ``path``: the file does not read (truncated, empty, not torch's),
                is not a state dict, its tensors do not fit the architecture, or hold NaN / infinity.
        """
        path = Path(path)
        state = read_weights(path, "DAC")
        kwargs: dict[str, Any] = {}
        if isinstance(state, dict) and "state_dict" in state:
            meta = state.get("metadata") or {}
            meta = (meta.get("kwargs") if isinstance(meta, dict) else None) or {}
            known = {
                "encoder_dim",
                "encoder_rates",
                "latent_dim",
                "decoder_dim",
                "decoder_rates",
                "n_codebooks",
                "codebook_size",
                "codebook_dim",
                "sample_rate",
            }
            kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in meta.items() if k in known}
            state = state["state_dict"]
        state = tensor_state(state, path, "DAC")
        try:
            codec = cls(**{**kwargs, **overrides})
        except (TypeError, ValueError, RuntimeError) as err:  # metadata of the wrong type or value
            raise ValueError(f"{path}: its DAC metadata {kwargs} does not build a codec ({first_line(err)})") from err
        described = ", ".join(f"{k}={v}" for k, v in kwargs.items()) or "no metadata: defaults"
        check_fits(codec.state_dict(), state, path, f"the DAC its metadata describes ({described})")
        codec.load_state_dict(state)
        return codec.eval()

    @torch.no_grad()
    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        """(N,) float waveform at ``sample_rate`` -> (ceil(N / hop), K) int64 codes."""
        x = torch.as_tensor(wav, dtype=torch.float32, device=self._device).reshape(1, 1, -1)
        x = F.pad(x, (0, (-x.shape[-1]) % self.hop_length))  # whole hops (DAC pads on the right)
        return self.quantizer.encode(self.encoder(x))[0]  # (T, K)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(T, K) int64 codes -> (about T * hop,) float waveform in [-1, 1]."""
        z = self.quantizer.decode(codes.long().to(self._device)[None])  # (1, D, T)
        return self.decoder(z)[0, 0]
