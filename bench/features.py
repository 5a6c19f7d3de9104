"""Feature-extraction benchmark: the MELD mel front end vs a plain librosa loop, per core.

What it measures, on ~200 real corpus files (evenly spread over the training manifest), in
one process with one thread (OMP/MKL/OpenBLAS threads = 1, torch threads = 1):

* ``ours``: decode + features as the features stage does it, ``meld.audio.load_audio`` then
  ``meld.features.log_mel`` (float64 numpy STFT, Slaney mel, log10);
* ``librosa``: ``librosa.load(sr=16000)`` then ``librosa.feature.melspectrogram(power=1, n_fft=1024,
  hop_length=256, win_length=1024, window="hann", center=True, pad_mode="reflect", n_mels=80,
  fmin=80, fmax=7600, htk=False, norm="slaney")`` then ``log10(max(1e-10, mel))``: the same
  parameters (librosa's STFT runs in float32, so it differs from ours by ~1e-4 in log10);
* files/s and x realtime (seconds of audio per second of compute), best of ``--repeats`` passes
  over all files (noise from other processes only ever adds time), and the ratio ours / librosa.

Then, on already-decoded audio, candidate faster extractors that must agree with the current
``log_mel`` to 1e-6 (max absolute difference in the float32 log10 output), each a proposed
change to ``meld/features.py``:

* ``sparse``: the mel projection as a sparse product (the Slaney filterbank has 942 non-zeros
  out of 41,040), the rest unchanged;
* ``lean``: ``sparse`` plus the reflect padding written straight into one float64 buffer;
* ``chunked``: the same numpy float64 maths over blocks of 64 frames with preallocated buffers
  (a 64 x 1024 float64 block stays in L2; the current code materialises the whole (T, 1024)
  windowed copy and the (T, 513) complex spectrum, a few MB per utterance);
* ``torch``: ``torch.stft`` in float64 (one thread) + the same filterbank;
* ``batched``: several utterances' frames concatenated into one block (what a features stage
  that extracts many files per call could do).

Run (from the repository root):
    .venv/bin/python -m bench.features           # ~200 files, ~1-2 min
    .venv/bin/python -m bench.features --quick   # 40 files, one pass
Options: --files N, --repeats N, --data DIR, --out NAME.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):  # per core: before numpy loads
    os.environ[_var] = "1"

from bench._common import (  # noqa: E402
    CLOCKS,
    ROOT,
    clock_name,
    load_average,
    machine_info,
    now,
    table,
    use_clock,
    write_result,
)

SR = 16_000
CHUNK = 64  # frames per block in the chunked extractor


# ---------------------------------------------------------------------------- extractors
def ours(path: str):
    from meld.audio import load_audio
    from meld.features import log_mel

    return log_mel(load_audio(path), SR)


def librosa_loop(path: str):
    import librosa
    import numpy as np

    y, _ = librosa.load(path, sr=SR)
    mel = librosa.feature.melspectrogram(
        y=y,
        sr=SR,
        n_fft=1024,
        hop_length=256,
        win_length=1024,
        window="hann",
        center=True,
        pad_mode="reflect",
        power=1.0,
        n_mels=80,
        fmin=80.0,
        fmax=7600.0,
        htk=False,
        norm="slaney",
    )  # (80, T)
    return np.log10(np.maximum(1e-10, mel)).T


def _frames(wav):
    """Centred, reflect-padded (T, 1024) float64 frame view, exactly as meld.features.log_mel builds it."""
    import numpy as np

    from meld.features import HOP_LENGTH, N_FFT

    x = np.pad(wav.astype(np.float64), (N_FFT // 2, N_FFT // 2), mode="reflect")
    n = 1 + (x.size - N_FFT) // HOP_LENGTH
    return np.lib.stride_tricks.sliding_window_view(x, N_FFT)[::HOP_LENGTH][:n]


def chunked(wav, chunk: int = CHUNK):
    """Same maths as log_mel, over blocks of ``chunk`` frames with reused buffers."""
    return chunked_frames(_frames(wav), chunk)


_SPARSE_FB = []


def sparse_filterbank():
    """The (80, 513) Slaney filterbank as CSR: 942 non-zeros instead of 41,040 (each FFT bin
    feeds at most two triangles), so the mel projection is ~40x fewer multiply-adds."""
    if not _SPARSE_FB:
        import scipy.sparse

        from meld.features import mel_filterbank

        _SPARSE_FB.append(scipy.sparse.csr_matrix(mel_filterbank().T))
    return _SPARSE_FB[0]


def sparse_mel(wav):
    """log_mel with the mel projection as a sparse product (same terms summed; ~1e-16 apart)."""
    import numpy as np

    from meld.features import LOG_FLOOR, _periodic_hann

    spec = np.abs(np.fft.rfft(_frames(wav) * _periodic_hann(), axis=-1))  # (T, 513)
    mel = (sparse_filterbank() @ spec.T).T  # (T, 80)
    return np.log10(np.maximum(mel, LOG_FLOOR)).astype(np.float32)


def lean(wav):
    """sparse mel projection + reflect padding written into one preallocated float64 buffer
    (``np.pad`` twice plus ``astype`` cost ~12% of log_mel) + in-place magnitude/log."""
    import numpy as np

    from meld.features import HOP_LENGTH, LOG_FLOOR, N_FFT, _periodic_hann

    pad = N_FFT // 2
    n = wav.size
    if n <= pad:  # shorter than the pad: numpy's repeated reflection, as log_mel
        x = np.pad(wav.astype(np.float64), (pad, pad), mode="reflect")
    else:
        x = np.empty(n + 2 * pad)
        x[pad : pad + n] = wav  # float64 cast on the way in
        x[:pad] = x[2 * pad : pad : -1]  # reflect: w[pad], ..., w[1]
        x[pad + n :] = x[pad + n - 2 : n - 2 : -1]  # reflect: w[n-2], ..., w[n-1-pad]
    frames = np.lib.stride_tricks.sliding_window_view(x, N_FFT)[::HOP_LENGTH][: 1 + n // HOP_LENGTH]
    spec = np.abs(np.fft.rfft(frames * _periodic_hann(), axis=-1))  # (T, 513)
    mel = (sparse_filterbank() @ spec.T).T  # (T, 80)
    return np.log10(np.maximum(mel, LOG_FLOOR, out=mel), out=mel).astype(np.float32)


def torch_stft(wav):
    import numpy as np
    import torch

    from meld.features import HOP_LENGTH, LOG_FLOOR, N_FFT, WIN_LENGTH, _periodic_hann, mel_filterbank

    x = torch.from_numpy(wav.astype(np.float64))  # (torch's reflect pad needs > 512 samples)
    spec = torch.stft(
        x,
        N_FFT,
        HOP_LENGTH,
        WIN_LENGTH,
        window=torch.from_numpy(_periodic_hann()),
        center=True,
        pad_mode="reflect",
        return_complex=True,
    )  # (513, T)
    mel = spec.abs().T @ torch.from_numpy(mel_filterbank())
    return torch.log10(mel.clamp_min(LOG_FLOOR)).float().numpy()


def batched(wavs: list, chunk: int = CHUNK) -> list:
    """Many utterances at once: their frames stacked, then processed in blocks of ``chunk``."""
    import numpy as np

    views = [_frames(w) for w in wavs]
    out = chunked_frames(np.concatenate(views), chunk)
    bounds = np.cumsum([0] + [v.shape[0] for v in views])
    return [out[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def chunked_frames(frames, chunk: int = CHUNK):
    """(T, 1024) float64 frames -> (T, 80) float32 log-mel, ``chunk`` frames at a time."""
    import numpy as np

    from meld.features import LOG_FLOOR, _periodic_hann, mel_filterbank

    win, fb = _periodic_hann(), mel_filterbank()
    n = frames.shape[0]
    mel = np.empty((n, fb.shape[1]))
    buf = np.empty((min(chunk, n), frames.shape[1]))
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        np.multiply(frames[s:e], win, out=buf[: e - s])
        np.matmul(np.abs(np.fft.rfft(buf[: e - s], axis=-1)), fb, out=mel[s:e])
    return np.log10(np.maximum(mel, LOG_FLOOR, out=mel), out=mel).astype(np.float32)


def stage_times(wavs: list, repeats: int) -> dict:
    """Seconds spent in each stage of the current ``log_mel`` over all ``wavs`` (best of ``repeats``)."""
    import numpy as np

    from meld.features import LOG_FLOOR, _periodic_hann, mel_filterbank

    win, fb = _periodic_hann(), mel_filterbank()
    best: dict = {}
    for _ in range(repeats):
        acc = dict.fromkeys(("pad+frame", "window", "rfft", "abs", "mel matmul", "log10+cast"), 0.0)
        for w in wavs:
            t0 = now()
            frames = _frames(w)
            t1 = now()
            x = frames * win
            t2 = now()
            spec = np.fft.rfft(x, axis=-1)
            t3 = now()
            mag = np.abs(spec)
            t4 = now()
            mel = mag @ fb
            t5 = now()
            np.log10(np.maximum(mel, LOG_FLOOR)).astype(np.float32)
            t6 = now()
            for k, dt in zip(acc, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
                acc[k] += dt
        best = {k: min(v, best.get(k, v)) for k, v in acc.items()}
    return best


# ---------------------------------------------------------------------------- timing
def best_pass(fn, items, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t = now()
        for it in items:
            fn(it)
        times.append(now() - t)
    return min(times), times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="40 files, one pass")
    parser.add_argument("--files", type=int, default=200, help="corpus files to extract")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the files; the fastest counts")
    parser.add_argument("--data", default=str(ROOT / "data"), help="pipeline outputs: corpus/")
    parser.add_argument("--out", default="features", help="results file stem under bench/results/")
    parser.add_argument(
        "--threads", type=int, choices=[1], default=1, help="per core by definition: always 1"
    )
    parser.add_argument(
        "--clock",
        choices=CLOCKS,
        default=clock_name(),
        help="wall (default) or cpu: CPU seconds, immune to time-slicing on a loaded machine",
    )
    args = parser.parse_args(argv)
    use_clock(args.clock)

    import librosa
    import numpy as np
    import soundfile as sf
    import torch

    from meld.audio import load_audio
    from meld.features import log_mel

    torch.set_num_threads(1)
    n_files = 40 if args.quick else args.files
    repeats = 1 if args.quick else args.repeats
    corpus = Path(args.data).resolve() / "corpus/train"
    rows = [json.loads(line) for line in (corpus / "manifest.jsonl").read_text().splitlines() if line.strip()]
    step = max(1, len(rows) // n_files)
    paths = [str(corpus / r["audio"]) for r in rows[::step][:n_files]]
    audio_s = sum(sf.info(p).duration for p in paths)
    info = machine_info(threads=1)
    info["librosa"] = librosa.__version__
    print(
        f"# features benchmark: {len(paths)} files, {audio_s:.1f} s of audio, 1 thread, "
        f"load average {info['load_average_at_start']}",
        flush=True,
    )
    t_all = time.perf_counter()

    for fn in (ours, librosa_loop):  # warm-up: imports, filterbank cache, FFT plans
        for p in paths[:3]:
            fn(p)
    results = []
    for name, fn in (("ours (load_audio + log_mel)", ours), ("librosa loop", librosa_loop)):
        best, times = best_pass(fn, paths, repeats)
        results.append(
            {
                "method": name,
                "seconds": best,
                "all_seconds": times,
                "files_per_s": len(paths) / best,
                "x_realtime": audio_s / best,
            }
        )
        print(f"  {name}: {best:.2f} s", flush=True)
    for r in results:
        r["speedup_vs_librosa"] = results[1]["seconds"] / r["seconds"]
    ref = {p: ours(p) for p in paths}
    lib_diff = max(float(np.abs(librosa_loop(p) - ref[p]).max()) for p in paths)
    lib_mean = float(np.mean([np.abs(librosa_loop(p) - ref[p]).mean() for p in paths]))

    # candidates on decoded audio (decoding is the same for all of them; timed separately)
    decode_s, _ = best_pass(load_audio, paths, repeats)
    wavs = [load_audio(p) for p in paths]
    refs = [ref[p] for p in paths]
    candidates = {
        "current log_mel": lambda w: log_mel(w, SR),
        "sparse mel projection": sparse_mel,
        "lean (sparse mel + one-buffer reflect pad)": lean,
        f"chunked ({CHUNK} frames)": chunked,
        "torch.stft float64": torch_stft,
    }
    variants = []
    for name, fn in candidates.items():
        fn(wavs[0])
        best, times = best_pass(fn, wavs, repeats)
        diff = max(float(np.abs(fn(w) - r).max()) for w, r in zip(wavs, refs))
        variants.append({"extractor": name, "seconds": best, "all_seconds": times, "max_abs_diff": diff})
    for group in (8, 32):
        groups = [wavs[i : i + group] for i in range(0, len(wavs), group)]
        best, times = best_pass(batched, groups, repeats)
        outs = [m for g in groups for m in batched(g)]
        diff = max(float(np.abs(m - r).max()) for m, r in zip(outs, refs))
        variants.append(
            {
                "extractor": f"batched ({group} files/call, chunked)",
                "seconds": best,
                "all_seconds": times,
                "max_abs_diff": diff,
            }
        )
    stages = stage_times(wavs, repeats)
    base = variants[0]["seconds"]
    lib = results[1]["seconds"]
    for v in variants:
        v["speedup_vs_current"] = base / v["seconds"]
        v["exact_1e-6"] = v["max_abs_diff"] <= 1e-6
        v["with_decode_s"] = v["seconds"] + decode_s
        v["x_realtime_with_decode"] = audio_s / v["with_decode_s"]
        v["speedup_vs_librosa_with_decode"] = lib / v["with_decode_s"]

    print()
    print(
        table(
            results,
            [
                ("method", "method"),
                ("seconds", "s (best pass)"),
                ("files_per_s", "files/s"),
                ("x_realtime", "x realtime"),
                ("speedup_vs_librosa", "speed-up vs librosa"),
            ],
        )
    )
    print(
        f"\nours vs librosa output: max |diff| {lib_diff:.2e}, mean |diff| {lib_mean:.2e} (log10; librosa's STFT is float32)"
    )
    print(f"decode alone (load_audio): {decode_s:.2f} s\n")
    print(
        table(
            variants,
            [
                ("extractor", "extractor (decoded audio)"),
                ("seconds", "s"),
                ("speedup_vs_current", "vs current"),
                ("max_abs_diff", "max |diff| vs current"),
                ("exact_1e-6", "within 1e-6"),
                ("x_realtime_with_decode", "x realtime incl. decode"),
                ("speedup_vs_librosa_with_decode", "vs librosa incl. decode"),
            ],
        )
    )
    print("\nwhere the current log_mel spends its time (all files, s):")
    print(
        table(
            [{"stage": k, "seconds": v, "share": v / sum(stages.values())} for k, v in stages.items()]
            + [{"stage": "decode (load_audio)", "seconds": decode_s}],
            [("stage", "stage"), ("seconds", "s"), ("share", "share of log_mel")],
        )
    )
    floor = decode_s + stages["window"] + stages["rfft"] + stages["abs"]
    print(
        f"float64 floor (decode + window + rfft + abs, mel/log free): {floor:.3f} s = "
        f"{results[1]['seconds'] / floor:.2f}x the librosa loop at best"
    )
    info["load_average_at_end"] = load_average()
    path = write_result(
        args.out,
        {
            "benchmark": "features",
            "quick": args.quick,
            "machine": info,
            "files": len(paths),
            "audio_seconds": audio_s,
            "repeats": repeats,
            "threads": 1,
            "results": results,
            "librosa_max_abs_diff": lib_diff,
            "librosa_mean_abs_diff": lib_mean,
            "decode_seconds": decode_s,
            "variants": variants,
            "log_mel_stages": stages,
            "float64_floor_seconds": decode_s + stages["window"] + stages["rfft"] + stages["abs"],
            "seconds": time.perf_counter() - t_all,
        },
    )
    print(f"wrote {path.relative_to(ROOT)} in {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
