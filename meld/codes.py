"""DAC codes for Codec-LM: which codec made them, encoding audio, and TTS continuation of code prompts.

A codec **description** (a JSON-able dict) travels with the codes: the codes stage writes it to
``codec.json`` beside the code store, training copies it into the codec_lm checkpoint, and
evaluation and ``meld synthesize`` rebuild the same codec from it to decode what the model says::

    {"weights": "/abs/weights_16khz.pth" | null,   # DAC's released weights, or null: random
     "random": false | true,                       # true: a seeded random DAC, its codes carry no speech
     "seed": 0, "random_kwargs": {...},            # how to rebuild the random one (random only)
     "n_levels": 12, "codebook_size": 1024, "sample_rate": 16000, "hop_length": 320, "frame_rate": 50.0,
     "state_sha256": "..."}                        # hash of the codec's weights: a rebuilt codec must match

Example::

    codec, desc = build_codec(None, n_levels=12, codebook_size=1024, random_width=4, seed=0)
    codes = encode_waveform(codec, wav)               # (T, 12) int16 at 50 Hz
    same = codec_from_description(desc)               # the same codec again (checked by hash)
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from meld.audio import SAMPLE_RATE
from meld.models.codec_lm import DACCodec

CODEC_FILE = "codec.json"  # the description, beside the code store's split folders
DAC_DECODER_WIDTH_RATIO = 24  # DAC 16 kHz: encoder_dim 64, decoder_dim 1536


class CodecMismatch(ValueError):
    """A rebuilt codec is not the one that made the codes (other weights, or another initialisation)."""


def random_codec_kwargs(width: int, n_levels: int, codebook_size: int) -> dict:
    """DACCodec kwargs of a narrow random DAC: DAC 16 kHz's strides and levels, ``width`` encoder channels.

    Codes of a random codec mean nothing whatever its width, so only the shapes (50 Hz, K levels of N)
    need to be DAC's; a narrow one encodes the mini corpus in well under a minute on two CPU cores.
    """
    return dict(encoder_dim=width, decoder_dim=DAC_DECODER_WIDTH_RATIO * width, n_codebooks=n_levels,
                codebook_size=codebook_size)


def state_fingerprint(codec: DACCodec) -> str:
    """sha256 over the codec's parameter names, shapes and values (identifies the weights, not the file)."""
    h = hashlib.sha256()
    for name, tensor in sorted(codec.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _random_codec(kwargs: dict, seed: int) -> DACCodec:
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's random stream
        torch.manual_seed(seed)
        return DACCodec(**kwargs).eval()


def _load_weights(path: str | Path) -> DACCodec:
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"DAC weights {path} is a folder: give the weights_16khz.pth file itself")
    if not path.is_file():
        raise FileNotFoundError(f"DAC weights {path} not found: put DAC's weights_16khz.pth there "
                                "(nothing is downloaded), or set codec_lm.codec_weights to null for a random codec")
    return DACCodec.load(path)


def build_codec(weights: str | Path | None, *, n_levels: int, codebook_size: int, random_width: int,
                seed: int) -> tuple[DACCodec, dict]:
    """The codec that makes the code store, and its description.

    Args:
        weights: local path of DAC's ``weights_16khz.pth``; None: a seeded random DAC.
        n_levels, codebook_size: what the Codec-LM expects (the weights must have exactly these).
        random_width, seed: the random DAC's encoder width and initialisation seed.

    Returns:
        (codec in eval mode, description dict).

    Raises:
        FileNotFoundError: ``weights`` does not exist.
        ValueError: the file does not load (truncated, other shapes than its metadata, NaN), or the
            weights are not a 16 kHz codec, or have other levels / codebook sizes than the Codec-LM's.
    """
    if weights:
        codec = _load_weights(weights)
        if codec.sample_rate != SAMPLE_RATE:  # the corpus, the judges and the CLI all work at 16 kHz
            raise ValueError(f"{weights}: a {codec.sample_rate} Hz codec; Codec-LM uses DAC's 16 kHz model "
                             "(weights_16khz.pth)")
        if (codec.n_codebooks, codec.codebook_size) != (n_levels, codebook_size):
            raise ValueError(f"{weights}: the codec has {codec.n_codebooks} levels of {codec.codebook_size} codes, "
                             f"codec_lm.args asks for {n_levels} of {codebook_size}")
        desc = {"weights": str(Path(weights).resolve()), "random": False, "seed": None, "random_kwargs": None}
    else:
        kwargs = random_codec_kwargs(random_width, n_levels, codebook_size)
        codec = _random_codec(kwargs, seed)
        desc = {"weights": None, "random": True, "seed": seed, "random_kwargs": kwargs}
    desc.update(n_levels=codec.n_codebooks, codebook_size=codec.codebook_size, sample_rate=codec.sample_rate,
                hop_length=codec.hop_length, frame_rate=codec.frame_rate, state_sha256=state_fingerprint(codec))
    return codec, desc


DESCRIPTION_KEYS = ("weights", "random", "seed", "random_kwargs", "n_levels", "codebook_size", "sample_rate",
                    "hop_length", "frame_rate", "state_sha256")


def read_codec_description(codes_dir: str | Path) -> dict:
    """A code store's ``codec.json``, checked: training and evaluation read it before anything else, and a
    truncated or hand-edited one was a JSONDecodeError or KeyError traceback naming no file.

    Raises:
        FileNotFoundError: the folder holds no ``codec.json``.
        CodecMismatch: it is not a JSON object holding every key :func:`build_codec` writes.
    """
    from meld.weights import read_json_object

    path = Path(codes_dir) / CODEC_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{codes_dir}: no {CODEC_FILE} (did the codes stage run?)")
    try:
        desc = read_json_object(path)
    except ValueError as err:
        raise CodecMismatch(f"{err}; rerun the codes stage") from err
    missing = [k for k in DESCRIPTION_KEYS if k not in desc]
    if missing:
        raise CodecMismatch(f"{path}: not a codec description (no {', '.join(missing)}); rerun the codes stage")
    return desc


def codec_from_description(desc: dict, weights: str | Path | None = None) -> DACCodec:
    """Rebuild the codec a description names, and check it is the very one (same weights hash).

    Args:
        desc: a description from :func:`build_codec` (``codec.json``, or a checkpoint's ``extra.codec``).
        weights: where DAC's weights file is on this machine, if not at the recorded path.

    Raises:
        FileNotFoundError: real weights, and no file at ``weights`` or the recorded path.
        CodecMismatch: the rebuilt codec's weights differ from the recorded hash.
    """
    if desc.get("random"):
        codec = _random_codec(desc["random_kwargs"], int(desc["seed"]))
        source = f"the random DAC (seed {desc['seed']})"
    else:
        path = weights or desc.get("weights")
        if not path:
            raise FileNotFoundError("the codec description names no weights file; give the DAC weights path")
        codec = _load_weights(path)
        source = f"the DAC weights in {path}"
    found = state_fingerprint(codec)
    if found != desc.get("state_sha256"):
        raise CodecMismatch(f"{source} hash to {found[:12]}, but the codes were made by a codec hashing to "
                            f"{str(desc.get('state_sha256'))[:12]}: other weights (or another torch initialisation); "
                            "use the weights that made the codes, or rerun the codes stage")
    return codec


def encode_waveform(codec: DACCodec, wav: np.ndarray) -> np.ndarray:
    """(samples,) float waveform at the codec's rate -> (ceil(samples / hop), K) int16 codes; no samples, no codes.

    Raises:
        ValueError: ``wav`` is not one channel of samples (the codec would read channels one after another).
    """
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim != 1:
        raise ValueError(f"DAC encodes a (samples,) mono waveform, got shape {wav.shape}")
    if wav.size == 0:  # a prompt cut to nothing (meld synthesize --prompt-seconds under a sample): the encoder's
        # first convolution cannot run on zero samples
        return np.zeros((0, codec.n_codebooks), np.int16)
    return codec.encode(torch.from_numpy(wav)).cpu().numpy().astype(np.int16)


def decode_codes(codec: DACCodec, codes: np.ndarray) -> np.ndarray:
    """(T, K) integer codes -> (about T * hop,) float32 waveform in [-1, 1]; no codes, no samples.

    Raises:
        ValueError: codes of another shape than the codec's (T, K), or outside its [0, codebook_size): a code
            store overwritten with other bytes of the same size, say, which the embedding lookup would only
            call "index out of range in self" (and extra levels it would drop without a word).
    """
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] != codec.n_codebooks:
        raise ValueError(f"a DAC of {codec.n_codebooks} levels decodes (frames, {codec.n_codebooks}) codes, "
                         f"got shape {codes.shape}")
    if len(codes) == 0:
        return np.zeros(0, np.float32)
    low, high = int(codes.min()), int(codes.max())
    if low < 0 or high >= codec.codebook_size:
        raise ValueError(f"codes {low}..{high} outside the DAC's codebooks of {codec.codebook_size} "
                         "(a corrupt code store, or codes of another codec)")
    return codec.decode(torch.from_numpy(codes.astype(np.int64))).cpu().numpy().astype(np.float32)


def prompt_code_frames(n_frames: int, prompt_seconds: float, frame_rate: float) -> int:
    """Code frames in the first ``prompt_seconds`` of an utterance of ``n_frames`` frames."""
    return min(n_frames, int(round(prompt_seconds * frame_rate)))


def prompt_codes(codec: DACCodec, wav: np.ndarray, prompt_seconds: float) -> np.ndarray:
    """A prompt's (P, K) codes as the evaluation takes them: ``wav`` (the prompt and at least the encoder's
    reach of what follows, at the codec's rate) encoded whole, then its first :func:`prompt_code_frames`
    kept. Encoding only the prompt's samples changed its last frames (the encoder sees past the cut)
    and could give one frame more, so a checkpoint continued other codes in ``meld synthesize``."""
    codes = encode_waveform(codec, wav)
    return codes[: prompt_code_frames(len(codes), prompt_seconds, codec.frame_rate)]


def check_prompt_codes(caller: str, prompts: list[np.ndarray], codebook_size: int) -> None:
    """Refuse a prompt code outside [0, ``codebook_size``), naming the prompt (its index in ``prompts``),
    the frame, the level and the value.

    Codec-LM embeds level k's token t as row k * (N + 2) + t of one table, so code N was read as that
    level's <EOS>, N + 1 as its <EMPTY> and larger ones as another level's codes, all without a word
    (codes of another codec, say), and a negative one failed inside ``embedding_bag`` naming no prompt.
    One min and one max per (P, K) host array; the first bad code is looked for only in a bad prompt.
    """
    for i, p in enumerate(prompts):
        p = np.asarray(p)
        if p.size == 0 or (p.min() >= 0 and p.max() < codebook_size):  # written so that a NaN fails it
            continue
        frame, level = (int(x) for x in np.argwhere(~((p >= 0) & (p < codebook_size)))[0])
        raise ValueError(f"{caller}: prompt {i} holds code {p[frame, level].item()} at frame {frame}, level {level}, "
                         f"outside this model's codebook 0..{codebook_size - 1} (codes of another codec?)")


@dataclass
class CodeContinuation:
    codes: np.ndarray  # (T, K) int64 codes generated after the prompt
    hit_max_length: bool


@torch.no_grad()
def continue_codes(
    model,
    texts: list[list[int]],
    prompts: list[np.ndarray],
    *,
    max_frames: list[int] | int,
    temperature: float,
    top_k: int,
    top_p: float,
    batch_size: int = 8,
    seed: int = 0,
    first_batch: int = 0,
    kv_cache_dtype: str = "float32",
    progress_desc: str | None = None,
) -> list[CodeContinuation]:
    """Continue each code prompt ((P, K) integer codes, P may be 0) speaking its full transcript.

    The code counterpart of :func:`meld.generate.tts_continue`: batched, KV-cached, seeded.

    Args:
        model: a :class:`meld.models.codec_lm.CodecLM`.
        texts: BPE ids of each full transcript.
        max_frames: guard in code frames (per utterance or one for all): each utterance stops at its
            own, whichever utterances share its batch, and returns at most that many frames (a guard of
            0: (0, K) codes with ``hit_max_length`` True, as :func:`meld.generate.tts_continue` does).
        batch_size: utterances generated together (finished ones leave the batch).
        seed, first_batch: batch k is seeded ``batch_seed(seed, first_batch + k)``, as in ``tts_continue``.
        kv_cache_dtype: ``float32`` or ``bfloat16`` (:func:`meld.models.backbone.check_cache_dtype`).
        progress_desc: show a progress bar over the utterances under this label (None: none).

    Raises:
        ValueError: as :func:`meld.generate.check_continuation_inputs` says, prompts of (P, K) codes; a
            BPE id outside the model's text vocabulary (:func:`meld.generate.check_text_ids`); a prompt
            code outside the model's codebook (:func:`check_prompt_codes`).
    """
    from meld.generate import batch_seed, check_continuation_inputs, check_text_ids
    from meld.models.backbone import check_cache_dtype
    from meld.progress import progress

    cache_dtype = check_cache_dtype(kv_cache_dtype)
    K = model.n_levels
    max_frames = check_continuation_inputs("continue_codes", texts, prompts, max_frames, batch_size, K,
                                           "integer codes")
    check_text_ids("continue_codes", model, texts)
    check_prompt_codes("continue_codes", prompts, model.codebook_size)
    device = next(model.parameters()).device
    out: list[CodeContinuation] = []
    bar = progress(total=len(texts), desc=progress_desc, unit="utt", disable=progress_desc is None)
    for k, s in enumerate(range(0, len(texts), batch_size), start=first_batch):
        g = torch.Generator(device=device).manual_seed(batch_seed(seed, k))
        chunk_prompts, chunk_texts = prompts[s : s + batch_size], texts[s : s + batch_size]
        B = len(chunk_prompts)
        P = max(p.shape[0] for p in chunk_prompts)
        prompt = torch.zeros(B, P, K, dtype=torch.long)  # (B, P, K), padding masked by prompt_len
        rows = prompt.numpy()  # the same memory; numpy copies read-only arrays (Ray's) without a warning
        for b, p in enumerate(chunk_prompts):
            rows[b, : p.shape[0]] = p
        L = max(1, max(len(t) for t in chunk_texts))
        text = torch.zeros(B, L, dtype=torch.long)
        for b, t in enumerate(chunk_texts):
            text[b, : len(t)] = torch.tensor(t, dtype=torch.long)
        gen = model.generate(
            text.to(device), torch.tensor([len(t) for t in chunk_texts], device=device), prompt.to(device),
            torch.tensor([p.shape[0] for p in chunk_prompts], device=device),
            max_frames=[math.ceil(m) for m in max_frames[s : s + batch_size]], temperature=temperature,
            top_k=top_k, top_p=top_p, generator=g, kv_cache_dtype=cache_dtype,
        )
        out += [CodeContinuation(codes.cpu().numpy(), hit) for codes, hit in zip(gen.frames, gen.hit_max_length)]
        bar.update(len(chunk_texts))
    bar.close()
    return out
