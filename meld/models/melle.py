"""MELLE (Meng et al., arXiv 2407.08551): continuous mel frames with a Gaussian latent sampling module.

TTS sequence: ``[BPE text] <TTS> x_1 ... x_T``; step t (0..T) predicts frame t (t < T) and
``stop = [t == T]`` (the layout and generation loop are Mel-LM's, ``meld/models/mel_lm.py``).

Latent sampling module, per step: ``(mu_t, log sigma_t^2) = Linear(h_t)`` in frame space (80*r),
``z_t = mu_t + sigma_t * eps`` (reparameterised, eps ~ N(0, I)), and the r frames before the
postnet ``y'_t = z_t + MLP(z_t)``. The residual keeps z in frame space, so the KL to N(y_t, I)
and the flux on mu are about the frames themselves. The postnet refines y' into y''.

Losses (unweighted here; paper weights go in params.yaml ``train.loss_weights``):

======== ============================================= ============
name     definition (means over real frames/channels)  paper weight
======== ============================================= ============
l1_pre   |y' - y|                                      1
mse_pre  (y' - y)^2                                    1
l1_post  |y'' - y|                                     1
mse_post (y'' - y)^2                                   1
kl       KL(N(mu, sigma^2) || N(y, I)), 0 before       0.1
         ``kl_start_step`` (gated inside the model)
flux     -|mu_t - y_{t-1}|  (t >= 1), 0 before         0.5
         ``flux_start_step`` (default 0: from the start)
stop     BCE, positive weight ``stop_pos_weight``=100  1
======== ============================================= ============

The schedules need the training step. The model counts its own training calls in the
``train_steps`` buffer (part of the state dict, so a resumed run continues the count); a
trainer that knows the true optimiser step may set ``model.current_step`` instead, which wins.

The flux term is unbounded below: only the KL holds mu near y. Without it (before
``kl_start_step``) mu drifts away steadily, which the residual MLP then has to undo; for short
runs set ``kl_start_step`` low, or ``flux_start_step = kl_start_step``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from meld.models.builders import backbone_kwargs, mel_frames_kwargs
from meld.models.layers import masked_frame_mean
from meld.models.mel_lm import ContinuousFrameLM, check_tts_task, stop_bce


def gaussian_kl_to_target(
    mu: torch.Tensor, logvar: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Mean over real frames and channels of KL(N(mu, exp(logvar)) || N(target, 1)).

    Per channel: 0.5 * (sigma^2 + (mu - y)^2 - 1 - log sigma^2). All (B, T, D); mask (B, T).
    """
    mu, logvar, target = mu.float(), logvar.float(), target.float()
    kl = 0.5 * (logvar.exp() + (mu - target).pow(2) - 1.0 - logvar)
    return masked_frame_mean(kl, mask)


def spectrogram_flux(mu: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MELLE's spectrogram flux loss: -mean_t mean_d |mu_t - y_{t-1}|, over steps whose two frames are real.

    Negative: it rewards predicted means that move away from the previous real frame, against
    static (repetitive, silent) predictions. mu, target: (B, T, D); mask (B, T).
    """
    if mu.shape[1] < 2:
        return mu.sum() * 0.0
    step = (mu[:, 1:].float() - target[:, :-1].float()).abs().mean(-1)  # (B, T-1)
    valid = mask[:, 1:] & mask[:, :-1]
    return -torch.where(valid, step, torch.zeros((), device=mu.device)).sum() / valid.sum().clamp_min(1)


@dataclass
class MELLEOutput:
    mu: torch.Tensor  # (B, T, D) latent mean of frame t
    logvar: torch.Tensor  # (B, T, D) latent log-variance of frame t
    mel_pre: torch.Tensor  # (B, T, D) y' = z + MLP(z), before the postnet
    mel_post: torch.Tensor  # (B, T, D) y'' after the postnet
    stop_logits: torch.Tensor  # (B, T+1) step t: "the utterance ends before frame t"
    frame_mask: torch.Tensor  # (B, T) real frames


class MELLE(ContinuousFrameLM):
    """The MELLE system.

    Args:
        n_text, frame_dim, d_model, n_layers, n_heads, d_ff, dropout, encoder_hidden, encoder_dropout,
        postnet_*: as :class:`~meld.models.mel_lm.ContinuousFrameLM` (frame_dim = 80 * r, r in 1..5).
        latent_hidden: width of the MLP mapping a latent z to the r frames.
        kl_start_step: training step from which the KL term counts (DESIGN: 10k); 0 before.
        flux_start_step: training step from which the flux term counts (paper: from the start).
        stop_pos_weight: BCE weight of the stop class (paper: 100).
        stop_threshold: generation ends once sigmoid(stop logit) exceeds it (0.5).
    """

    system = "melle"

    def __init__(
        self,
        *,
        n_text: int,
        frame_dim: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        d_ff: int,
        dropout: float,
        encoder_hidden: int,
        encoder_dropout: float,
        latent_hidden: int,
        postnet_channels: int,
        postnet_kernel: int,
        postnet_layers: int,
        postnet_dropout: float,
        kl_start_step: int = 10_000,
        flux_start_step: int = 0,
        stop_pos_weight: float = 100.0,
        stop_threshold: float = 0.5,
    ):
        super().__init__(
            n_text=n_text,
            frame_dim=frame_dim,
            d_model=d_model,
            n_layers=n_layers,
            n_heads=n_heads,
            d_ff=d_ff,
            dropout=dropout,
            encoder_hidden=encoder_hidden,
            encoder_dropout=encoder_dropout,
            postnet_channels=postnet_channels,
            postnet_kernel=postnet_kernel,
            postnet_layers=postnet_layers,
            postnet_dropout=postnet_dropout,
            stop_pos_weight=stop_pos_weight,
            stop_threshold=stop_threshold,
        )
        self.kl_start_step = kl_start_step
        self.flux_start_step = flux_start_step
        self.latent = nn.Linear(d_model, 2 * frame_dim)  # -> (mu, log sigma^2)
        self.latent_to_frames = nn.Sequential(
            nn.Linear(frame_dim, latent_hidden), nn.ReLU(), nn.Linear(latent_hidden, frame_dim)
        )
        self.register_buffer("train_steps", torch.zeros((), dtype=torch.long))  # training calls so far
        self.current_step: int | None = None  # set by a trainer to override train_steps

    # ------------------------------------------------------------------ latent sampling module
    def sample_latent(
        self, h: torch.Tensor, *, zero_latent: bool = False, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(..., d) hidden states -> (mu, logvar, y') each (..., D); ``zero_latent`` takes eps = 0."""
        mu, logvar = self.latent(h).chunk(2, dim=-1)  # (..., D) each
        if zero_latent:
            z = mu
        else:
            eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            z = mu + torch.exp(0.5 * logvar) * eps
        return mu, logvar, z + self.latent_to_frames(z)

    def predict_frame(
        self, h: torch.Tensor, *, zero_latent: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return self.sample_latent(h, zero_latent=zero_latent, generator=generator)[2]

    # ------------------------------------------------------------------ training
    def forward_tts(
        self,
        text: torch.Tensor,
        text_len: torch.Tensor,
        mel: torch.Tensor,
        mel_len: torch.Tensor,
        generator: torch.Generator | None = None,
        zero_latent: bool = False,
    ) -> MELLEOutput:
        """Teacher-forced pass; text (B, L) 0-based BPE ids, mel (B, T, D) normalised grouped frames.

        ``zero_latent`` uses the means (no eps), e.g. to compare with deterministic generation.
        """
        T = mel.shape[1]
        h, frame_mask = self.tts_hidden(text, text_len, mel, mel_len)  # (B, T+1, d)
        stop_logits = self.stop_head(h)[..., 0]  # (B, T+1)
        mu, logvar, mel_pre = self.sample_latent(h[:, :T], zero_latent=zero_latent, generator=generator)
        mel_post = self.postnet(mel_pre, frame_mask)
        return MELLEOutput(mu, logvar, mel_pre, mel_post, stop_logits, frame_mask)

    def schedule_gate(self, start_step: int) -> torch.Tensor:
        """1.0 from training step ``start_step`` on, 0.0 before (a 0-dim float tensor; no host sync)."""
        if self.current_step is not None:
            return torch.tensor(float(self.current_step >= start_step), device=self.train_steps.device)
        return (self.train_steps >= start_step).float()

    def compute_losses(
        self, batch: dict, task: str = "tts", generator: torch.Generator | None = None
    ) -> dict:
        """Namespaced losses for one batch (unweighted, but ``kl`` and ``flux`` are 0 before their start steps).

        A training-mode call with gradients on counts as one step of the schedules.
        """
        check_tts_task(self.system, task)
        kl_gate, flux_gate = self.schedule_gate(self.kl_start_step), self.schedule_gate(self.flux_start_step)
        if self.training and torch.is_grad_enabled():
            self.train_steps += 1
        out = self.forward_tts(batch["text"], batch["text_len"], batch["mel"], batch["mel_len"], generator)
        y, mask = batch["mel"], out.frame_mask
        return {
            "loss/l1_pre": masked_frame_mean((out.mel_pre - y).abs(), mask),
            "loss/mse_pre": masked_frame_mean((out.mel_pre - y).pow(2), mask),
            "loss/l1_post": masked_frame_mean((out.mel_post - y).abs(), mask),
            "loss/mse_post": masked_frame_mean((out.mel_post - y).pow(2), mask),
            "loss/kl": kl_gate * gaussian_kl_to_target(out.mu, out.logvar, y, mask),
            "loss/flux": flux_gate * spectrogram_flux(out.mu, y, mask),
            "loss/stop": stop_bce(out.stop_logits, batch["mel_len"], self.stop_pos_weight),
        }


def melle_kwargs(
    model_cfg,
    *,
    n_text: int,
    kl_start_step: int = 10_000,
    flux_start_step: int = 0,
    stop_pos_weight: float = 100.0,
    stop_threshold: float = 0.5,
) -> dict[str, Any]:
    """Constructor kwargs of :class:`MELLE` from a ModelConfig section and the BPE size.

    The latent-to-frames MLP takes ``recon_hidden`` as its width; ``q_temperature`` is MELD's, unused.
    """
    return dict(
        n_text=n_text,
        **backbone_kwargs(model_cfg),
        **mel_frames_kwargs(model_cfg),
        latent_hidden=model_cfg.recon_hidden,
        kl_start_step=int(kl_start_step),
        flux_start_step=int(flux_start_step),
        stop_pos_weight=float(stop_pos_weight),
        stop_threshold=float(stop_threshold),
    )
