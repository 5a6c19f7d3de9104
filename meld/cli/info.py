"""``meld info``: describe a checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from meld.cli.checkpoint import _tokenizer
from meld.cli.common import CLIError, _checkpoint_error, _first_line


def _human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    return f"{n} B"


def cmd_info(args: argparse.Namespace) -> int:
    from meld.models.builders import count_parameters
    from meld.training import CheckpointError, load_model

    path = Path(args.checkpoint)
    try:  # the weights loaded too, so that a checkpoint whose weights do not fit its model says so here
        model, state = load_model(path)
    except CheckpointError as err:
        raise CLIError(_checkpoint_error(path, err)) from err
    except Exception as err:
        raise CLIError(
            f"{path}: checkpoint does not rebuild into a model ({type(err).__name__}: {_first_line(err)})"
        ) from err
    kwargs = state.get("model_kwargs") or {}
    extra = state.get("extra") or {}
    n_text = kwargs.get("n_text")
    n_codes = kwargs.get("codebook_size", 0)
    vocab = getattr(model, "vocab", None)
    rows: list[tuple[str, Any]] = [
        ("file", f"{path} ({_human_size(path.stat().st_size)})"),
        ("system", state["system"]),
        ("task", extra.get("task", "n/a")),
        ("step", state.get("step", "n/a")),
        ("parameters", f"{count_parameters(model):,}"),
        ("reduction factor", extra.get("reduction_factor", "n/a")),
        ("vocab: BPE (model)", n_text if n_text is not None else "n/a"),
    ]
    if "bpe_model" in extra:
        try:
            rows.append(("vocab: BPE (tokenizer)", _tokenizer(state, path).vocab_size))
        except CLIError as err:
            rows.append(("vocab: BPE (tokenizer)", f"unreadable ({err})"))
    else:
        rows.append(("vocab: BPE (tokenizer)", "n/a (no embedded BPE model: not an inference checkpoint)"))
    rows.append(("vocab: codebook", n_codes))
    if vocab is not None:
        rows.append(("vocab: union", vocab.size))
    rows.append(("normalisation stats", "yes" if "norm_mean" in extra and "norm_std" in extra else "no"))
    if "codec" in extra:  # codec_lm: which codec its codes came from
        codec = extra["codec"]
        rows.append(("codec", f"random DAC (seed {codec.get('seed')}): codes carry no speech" if codec.get("random")
                     else f"DAC weights {codec.get('weights')}"))
    if "skipped_too_long" in extra:  # utterances its frame budget left out of training
        skipped = extra["skipped_too_long"]
        rows.append(("left out of training", f"{len(skipped)} utterance(s) longer than the frame budget"
                     + (f": {', '.join(row['id'] for row in skipped[:3])}{', ...' if len(skipped) > 3 else ''}"
                        if skipped else "")))
    rows.append(("fingerprint", extra.get("fingerprint", "n/a")))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print("model kwargs:")
    for k in sorted(kwargs):
        print(f"  {k} = {kwargs[k]}")
    return 0


