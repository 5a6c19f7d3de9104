"""params files load into their sections; the paper config builds a ~200M-parameter MELD."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from meld.config import (
    BPEConfig,
    CodebookConfig,
    CodecLMConfig,
    ConfigError,
    CorpusConfig,
    EvaluateConfig,
    FeaturesConfig,
    ModelConfig,
    TrainConfig,
    TuneConfig,
    read_params,
)
from meld.models.builders import build_model, count_parameters, meld_kwargs

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {"corpus": CorpusConfig, "features": FeaturesConfig, "codebook": CodebookConfig, "bpe": BPEConfig,
            "model": ModelConfig, "train": TrainConfig, "evaluate": EvaluateConfig, "tune": TuneConfig}
OPTIONAL = {"codec_lm": CodecLMConfig}  # only where the codec baseline is configured


@pytest.mark.parametrize("path", [ROOT / "params.yaml", ROOT / "configs" / "paper.yaml"], ids=lambda p: p.name)
def test_every_section_loads(path):
    """Each section validates (from_dict raises ConfigError on an unknown key or a bad value), and
    keeps the values the file gives rather than its defaults."""
    params = read_params(path)
    present = {name: cls for name, cls in OPTIONAL.items() if name in params}
    assert "codec_lm" in present or path.name == "paper.yaml"
    for name, cls in (SECTIONS | present).items():
        section = cls.from_dict(params[name], name)
        for key, value in params[name].items():
            got = getattr(section, key)
            assert (list(got) if isinstance(got, tuple) else got) == value, (name, key)


def test_wrong_params_are_clear_errors():
    with pytest.raises(ConfigError, match="train.*unknown.*max_stepz"):
        TrainConfig.from_dict({"max_stepz": 3}, "train")
    with pytest.raises(ConfigError, match="train.lr: expected a number"):
        TrainConfig.from_dict({"lr": "fast"}, "train")
    with pytest.raises(ConfigError, match="reduction_factor"):
        ModelConfig.from_dict({"reduction_factor": 7}, "model")
    with pytest.raises(ConfigError, match=r"evaluate.stt_ctc_weight must be in \[0, 1\]"):
        EvaluateConfig.from_dict({"stt_ctc_weight": 1.5}, "evaluate")


def test_paper_config_is_about_200m_parameters_and_trains_one_step():
    params = read_params(ROOT / "configs" / "paper.yaml")
    cfg = ModelConfig.from_dict(params["model"], "model")
    kwargs = meld_kwargs(cfg, n_text=params["bpe"]["vocab_size"], codebook_size=params["codebook"]["size"])
    model = build_model("meld", kwargs)
    n = count_parameters(model)
    assert 170e6 <= n <= 230e6, n
    torch.manual_seed(0)
    batch = {"mel": torch.randn(1, 40, 80), "mel_len": torch.tensor([40]),
             "text": torch.randint(0, 4096, (1, 12)), "text_len": torch.tensor([12])}
    losses = model.compute_losses(batch, "tts")
    sum(losses.values()).backward()
    assert model.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
