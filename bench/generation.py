"""Generation benchmark: MELD's KV-cached ``generate`` vs a full-recompute baseline, on CPU.

What it measures (10 s of speech per utterance, reduction factor r=2 from params.yaml, so
313 grouped frames = 626 mel frames = 10.016 s; the prompt is the first 3 s of real test
utterances and their full transcripts, sampling as in params.yaml ``evaluate``):

* ``kv``   - ``MELD.generate`` as shipped (batched, KV-cached, finished rows leave the batch);
* ``full`` - the same loop written here without a cache: every step re-runs the backbone over
  the whole prefix. Both paths use the model's own pieces and produce the same codes for the
  same generator (checked first, in float32, with test-time dropout off).

``<EOS>`` is made impossible (a subclass masks its logit), so every run lasts exactly the
requested number of frames. Batch 1 and 16; the tiny config (params.yaml ``model:``) and the
paper config (d 1024, 12 layers, 16 heads, FFN 4096, codebook 8192, BPE 4096: 186M parameters).

The paper config is too slow on CPU for full 313-step runs: it runs a few steps with the
real 3 s prefix ("start") and a few steps with a prefix already 313 frames longer ("end"),
and the per-step time is extrapolated as the trapezoid mean of the two (exact when the step
cost grows linearly with the prefix; the tiny config's full runs check this). Those rows say
``extrapolated``.

Reported per row: steps/s (grouped frames per second per batch), utterances/s, RTF (compute
seconds / seconds of audio produced, whole batch), per-step medians, peak memory = the
high-water RSS (``VmHWM``) of the timed runs, in a fresh process per cell, minus its RSS just before
them (model, inputs and a warm-up already resident; the high-water mark restarted there; for an
extrapolated row the larger of the start point's runs and the end point's from its first step on,
its long prompt's prefill being no part of a real generation), and the memory-bandwidth floor of a decode step
= bytes of the weights a step reads (everything but the token embedding, codebook and postnet) /
read bandwidth (best of a large ``torch.sum`` with the configured threads and with one thread,
measured in the same run); ``floor incl. KV`` adds the keys/values a cached step reads (at batch
16 they outweigh the tiny model's weights several times over).

Run (from the repository root):
    .venv/bin/python -m bench.generation            # full, ~5 min of CPU
    .venv/bin/python -m bench.generation --quick    # ~1 min: fewer frames and steps
    .venv/bin/python -m bench.generation --paper-full-b16   # adds the slowest row (+2 min)
Options: --threads N (torch intra-op threads; default: torch's default), --out NAME (results file stem).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (  # noqa: E402
    CLOCKS,
    ROOT,
    clock_name,
    current_rss,
    emit,
    load_average,
    machine_info,
    now,
    paper_meld_kwargs,
    peak_rss,
    reset_peak_rss,
    result_stem,
    run_cell,
    set_threads,
    table,
    use_clock,
    write_result,
)

AUDIO_SECONDS = 10.0
FRAME_RATE = 62.5
PROMPT_SECONDS = 3.0
DATA = ROOT / "data"  # --data: the pipeline's outputs (bpe/, codebook/, features/)


# ---------------------------------------------------------------------------- model and inputs
@functools.cache
def _evaluate_params() -> tuple:
    import yaml

    ev = yaml.safe_load((ROOT / "params.yaml").read_text())["evaluate"]
    return ev["temperature"], ev["top_k"], ev["top_p"], ev["repetition_penalty"]


def sampling_params() -> dict:
    """params.yaml's sampling settings, parsed once per process (not inside a timed run)."""
    temperature, top_k, top_p, penalty = _evaluate_params()
    return dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty_value=penalty)


def reduction_factor() -> int:
    import yaml

    return int(yaml.safe_load((ROOT / "params.yaml").read_text())["model"]["reduction_factor"])


def no_eos_meld(kwargs: dict, codebook):
    """A MELD (in eval mode) whose <EOS> can never be sampled: generation always runs to ``max_frames``.

    It also stamps the time at each step's start (``_code_logits`` runs once per step), so
    per-step times come out of an unmodified ``generate``, and calls ``at_first_step`` (when set)
    before the first stamp of a run: after the prompt's prefill, before the first decoding step.
    """
    from meld.models.meld import MELD

    class NoEOSMELD(MELD):
        step_times: list
        at_first_step = None

        def _code_logits(self, h, tts_head=None):
            if self.at_first_step is not None and not self.step_times:
                self.at_first_step()
            self.step_times.append(now())
            logits = super()._code_logits(h, tts_head)
            logits[:, 0] = float("-inf")  # column 0 is <EOS>
            return logits

    model = NoEOSMELD(**kwargs)
    model.set_codebook(codebook)
    model.step_times = []
    return model.eval()


def build(config: str):
    """(model, kwargs) for ``tiny`` (params.yaml model section, real BPE size and codebook) or ``paper``."""
    import numpy as np
    import torch
    import yaml

    from meld.config import ModelConfig
    from meld.models.builders import meld_kwargs
    from meld.text import BPETokenizer

    r = reduction_factor()
    torch.manual_seed(0)
    if config == "tiny":
        cfg = ModelConfig.from_dict(yaml.safe_load((ROOT / "params.yaml").read_text())["model"], "model")
        n_text = BPETokenizer(DATA / "bpe/bpe.model").vocab_size
        codebook = torch.from_numpy(np.load(DATA / f"codebook/r{r}.npy"))
        kwargs = meld_kwargs(cfg, n_text=n_text, codebook_size=codebook.shape[0])
    elif config == "paper":
        kwargs = paper_meld_kwargs(r)
        codebook = torch.randn(kwargs["codebook_size"], kwargs["frame_dim"])  # no 8192-code codebook exists for the mini corpus
    else:
        raise ValueError(config)
    return no_eos_meld(kwargs, codebook), kwargs


def inputs(batch: int, extra_prompt: int = 0):
    """Real test transcripts and their first 3 s (normalised, grouped by r) as prompts.

    ``extra_prompt`` > 0 lengthens every prompt by that many grouped frames (frames of other
    utterances appended), to time steps deep into a generation.
    """
    import numpy as np

    from meld.store import FeatureStore, collate, load_stats
    from meld.text import BPETokenizer

    r = reduction_factor()
    store = FeatureStore(DATA / "features/test")
    stats = load_stats(DATA / "features/stats.json")
    tok = BPETokenizer(DATA / "bpe/bpe.model")
    rows = [i for i, row in enumerate(store.index) if row["duration"] >= 4.0]
    n_prompt = round(PROMPT_SECONDS * FRAME_RATE)  # 188 mel frames
    pool = np.concatenate([stats.normalise(store[i]) for i in rows])
    mels, texts = [], []
    for b in range(batch):
        i = rows[b % len(rows)]
        mel = stats.normalise(store[i])[:n_prompt]
        if extra_prompt:
            start = (b * 997) % (len(pool) - extra_prompt * r)
            mel = np.concatenate([mel, pool[start : start + extra_prompt * r]])
        mels.append(mel)
        texts.append(tok.encode(store.index[i]["text"]))
    b = collate(mels, texts, r)
    return b["text"], b["text_len"], b["mel"], b["mel_len"]


# ---------------------------------------------------------------------------- the full-recompute baseline
def generate_full_recompute(
    model,
    text,
    text_len,
    prompt,
    prompt_len,
    *,
    max_frames: int,
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty_value: float,
    test_time_dropout: bool = True,
    generator=None,
):
    """``MELD.generate`` without a KV cache: each step re-runs the backbone over the whole prefix.

    Same sequence layout, positions, masks, sampling calls (so the same generator draws) and
    early exit of finished rows as the cached path; returns the same ``Generation``.
    """
    import torch

    from meld.models.backbone import packed_positions, prepare_for_decoding
    from meld.models.meld import Generation
    from meld.sampling import repetition_penalty, sample, top_k_mask

    # the same preparation and grad mode as MELD.generate (transposed weights, inference mode)
    prepare_for_decoding(model)
    with torch.inference_mode():
        B = prompt.shape[0]
        device = prompt.device
        x, valid, last = model.tts_prompt(text, text_len, prompt, prompt_len, test_time_dropout=test_time_dropout)
        positions = packed_positions(valid)  # (B, S)
        # as the cached path's steps (KVCache.all_valid): with no padding anywhere (every batch-1
        # run) the backbone gets no mask and takes SDPA's causal kernel, 7-8 % faster on a Xeon than
        # the same attention under an all-True mask; a baseline slowed by a needless mask would
        # flatter the KV cache. Rows that leave keep the rest unpadded; new frames are always real,
        # so an unpadded start needs no key_valid at all.
        key_valid = None if bool(valid.all()) else valid
        h = model.backbone(x, positions, key_valid)
        rows = torch.arange(B, device=device)
        h_last = h[rows, last]  # (B, d)
        next_pos = positions[rows, last] + 1

        active = torch.arange(B, device=device)
        frames: list[list] = [[] for _ in range(B)]
        codes: list[list[int]] = [[] for _ in range(B)]
        hit_max = [False] * B
        prev_cand = None
        for step in range(max_frames + 1):
            logits = model._code_logits(h_last)
            logits = repetition_penalty(logits, prev_cand, repetition_penalty_value)
            prev_cand = top_k_mask(logits, top_k) if top_k > 0 else None
            choice = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            if step == max_frames:
                for i in active.tolist():
                    hit_max[i] = True
                break
            stop = choice == 0
            z = (choice - 1).clamp_min(0)
            x_hat = model.reconstruct(h_last, z, encoder_dropout=test_time_dropout)  # (b, D)
            keep = (~stop).tolist()
            z_list = z.tolist()
            for row, i in enumerate(active.tolist()):
                if keep[row]:
                    frames[i].append(x_hat[row])
                    codes[i].append(z_list[row])
            if not any(keep):
                break
            if not all(keep):
                idx = (~stop).nonzero().squeeze(-1)
                active, x_hat, next_pos = active[idx], x_hat[idx], next_pos[idx]
                prev_cand = prev_cand[idx] if prev_cand is not None else None
                x, positions = x[idx], positions[idx]
                key_valid = key_valid[idx] if key_valid is not None else None
            emb = model.encoder(x_hat, dropout=test_time_dropout)[:, None]  # (b, 1, d)
            x = torch.cat([x, emb], dim=1)  # (b, S+t, d)
            positions = torch.cat([positions, next_pos[:, None]], dim=1)
            if key_valid is not None:
                key_valid = torch.cat([key_valid, torch.ones_like(key_valid[:, :1])], dim=1)
            h_last = model.backbone(x, positions, key_valid)[:, -1]  # the whole prefix, every step
            next_pos = next_pos + 1

        out = []
        for i in range(B):
            if frames[i]:
                out.append(model.postnet(torch.stack(frames[i])[None])[0])
            else:
                out.append(prompt.new_zeros(0, model.frame_dim))
        return Generation(out, hit_max, codes)


def run_path(model, path: str, batch_inputs, max_frames: int, seed: int, dropout: bool = True, kv_cache_dtype=None):
    """One generation; returns (Generation, wall seconds, step stamps). ``kv_cache_dtype``: the
    ``kv`` path's cache dtype (None: float32, the default of generation)."""
    import torch

    text, text_len, prompt, prompt_len = batch_inputs
    sampling_params()  # parsed before the clock starts (cached)
    g = torch.Generator(device=text.device).manual_seed(seed)  # on the inputs' device: a CPU generator cannot drive CUDA sampling
    torch.manual_seed(seed)  # test-time dropout draws from the global generator
    model.step_times = []
    t0 = now()
    if path == "kv":
        gen = model.generate(
            text,
            text_len,
            prompt,
            prompt_len,
            max_frames=max_frames,
            generator=g,
            test_time_dropout=dropout,
            kv_cache_dtype=kv_cache_dtype,
            **sampling_params(),
        )
    elif path == "full":
        gen = generate_full_recompute(
            model,
            text,
            text_len,
            prompt,
            prompt_len,
            max_frames=max_frames,
            generator=g,
            test_time_dropout=dropout,
            **sampling_params(),
        )
    else:
        raise ValueError(path)
    wall = now() - t0
    return gen, wall, t0, list(model.step_times)


def weight_bytes_per_step(model) -> int:
    """Bytes of parameters one decode step reads: all but the token embedding (row lookups),
    the codebook (row lookups), the postnet (runs once, after the loop) and the output layer's
    text rows (a TTS step computes only its <EOS> and code rows: ``MELD._tts_head``)."""
    skip = ("token_emb.", "postnet.")
    total = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith(skip))
    head = model.head
    unread_rows = head.weight.shape[0] - model._tts_head()[0].shape[0]
    return total - unread_rows * (head.weight.shape[1] + 1) * head.weight.element_size()  # weight row + bias


# ---------------------------------------------------------------------------- cells (fresh processes)
def cell_bandwidth(threads: int) -> dict:
    import numpy as np
    import torch

    n = 128 * 2**20  # 128M float32 = 512 MiB
    a = torch.ones(n)
    out = {}
    for nt in sorted({threads, 1}):
        torch.set_num_threads(nt)
        best = 0.0
        for _ in range(5):
            t = now()
            a.sum()
            best = max(best, a.numel() * 4 / (now() - t))
        out[f"read_gbs_{nt}thr"] = best / 1e9
    torch.set_num_threads(threads)
    an, bn = a.numpy(), np.empty(n, dtype=np.float32)
    best = 0.0
    for _ in range(3):
        t = now()
        np.copyto(bn, an)
        best = max(best, 2 * an.nbytes / (now() - t))
    out["copy_gbs_read_plus_write"] = best / 1e9
    out["read_gbs"] = max(v for k, v in out.items() if k.startswith("read_gbs_"))
    return out


def cell_verify(config: str, batch: int, frames: int, paths: list[str]) -> dict:
    """Each path against ``kv`` in float32, same generator, no test-time dropout: same codes? frame gap?"""
    model, _ = build(config)
    text, text_len, prompt, prompt_len = inputs(batch)
    # uneven prompts exercise the padded prefix: shorten some of them by up to 20 frames
    prompt_len = prompt_len - (prompt_len.new_tensor(range(batch)) * 7) % 21
    x = (text, text_len, prompt, prompt_len)
    ref, _, _, _ = run_path(model, "kv", x, frames, seed=123, dropout=False)
    out = {
        "config": config,
        "batch": batch,
        "frames": frames,
        "frames_per_row": [len(c) for c in ref.codes],
        "paths": {},
    }
    for path in paths:
        gen, _, _, _ = run_path(model, path, x, frames, seed=123, dropout=False)
        first_bad = None
        for i, (a, b) in enumerate(zip(ref.codes, gen.codes)):
            k = next((t for t, (u, v) in enumerate(zip(a, b)) if u != v), None)
            if k is not None or len(a) != len(b):
                first_bad = (i, k)
                break
        out["paths"][path] = {
            "same_codes": gen.codes == ref.codes,
            "first_mismatch": first_bad,
            "max_abs_frame_diff": max(float((a - b).abs().max()) for a, b in zip(ref.frames, gen.frames)),
        }
    return out


def _step_stats(wall: float, t0: float, stamps: list[float]) -> dict:
    steps = [b - a for a, b in zip(stamps[:-1], stamps[1:])]  # one decode step each
    return {
        "wall_s": wall,
        "prefill_s": stamps[0] - t0,
        "tail_s": t0 + wall - stamps[-1],
        "steps": len(steps),
        "step_median_s": statistics.median(steps),
        "step_mean_s": sum(steps) / len(steps),
        "steps_sum_s": sum(steps),
        "first_steps_median_s": statistics.median(steps[:24]),
        "last_steps_median_s": statistics.median(steps[-24:]),
    }


def cell_gen(config: str, path: str, batch: int, frames: int, mode: str, steps: int, repeats: int) -> dict:
    """Time one (config, path, batch). mode ``measured``: full runs of ``frames`` steps (best of
    ``repeats``); ``extrapolated``: ``steps`` steps at the start and at the end of a ``frames`` run."""
    import torch

    model, kwargs = build(config)
    x = inputs(batch)
    run_path(model, path, x, 3, seed=0)  # warm-up: first-call allocations, oneDNN init
    reset_peak_rss()  # the peak counts from here: not the model's construction or the warm-up
    rss0, load0 = current_rss(), load_average()
    res = {
        "config": config,
        "path": path,
        "batch": batch,
        "frames": frames,
        "mode": mode,
        "params": sum(p.numel() for p in model.parameters()),
        "weight_bytes_per_step": weight_bytes_per_step(model),
    }
    if mode == "measured":
        runs = []
        for rep in range(repeats):
            gen, wall, t0, stamps = run_path(model, path, x, frames, seed=rep)
            assert all(len(c) == frames for c in gen.codes), "EOS masking failed: a row stopped early"
            runs.append(_step_stats(wall, t0, stamps))
        best = min(runs, key=lambda s: s["wall_s"])
        res.update(best)
        res["wall_all_s"] = [r["wall_s"] for r in runs]
        # what the paper rows' trapezoid extrapolation would have predicted for this run
        res["trapezoid_estimate_s"] = (
            best["prefill_s"]
            + best["tail_s"]
            + frames * (best["first_steps_median_s"] + best["last_steps_median_s"]) / 2
        )
    else:
        _, wall_a, t0a, st_a = run_path(model, path, x, steps, seed=0)
        start = _step_stats(wall_a, t0a, st_a)
        start_peak = peak_rss()  # the real prompt's prefill and first steps
        x_end = inputs(batch, extra_prompt=frames)
        # The end run prefills a prompt `frames` longer than any real generation's, in one forward
        # pass: its activations are no part of a real run's peak (paper, KV, batch 16: 1,158 MB with
        # them, where a real 313-frame run peaks at 873 MB; 758 MB without). Its peak counts from its
        # first step: the cache as full as a real run's last step finds it, and the steps themselves.
        model.at_first_step = reset_peak_rss
        try:
            _, wall_b, t0b, st_b = run_path(model, path, x_end, steps, seed=1)
        finally:
            model.at_first_step = None
        end = _step_stats(wall_b, t0b, st_b)
        with torch.no_grad():  # the postnet runs once over the finished frames
            pre = torch.randn(batch, frames, kwargs["frame_dim"])
            t = now()
            model.postnet(pre)
            post_s = now() - t
        step = (start["step_median_s"] + end["step_median_s"]) / 2
        res.update(
            {
                "start_step_median_s": start["step_median_s"],
                "end_step_median_s": end["step_median_s"],
                "prefill_s": start["prefill_s"],
                "postnet_s": post_s,
                "step_median_s": step,
                "steps_timed": 2 * steps,
                "wall_s": start["prefill_s"] + frames * step + post_s,
            }
        )
    peak = peak_rss() if mode == "measured" else max(start_peak, peak_rss())
    res["peak_rss_delta_mb"] = (peak - rss0) / 2**20
    res["peak_rss_mb"] = peak / 2**20
    s0 = x[0].shape[1] + 1 + x[2].shape[1]  # padded prefix: text, <TTS>, 3 s prompt
    kv_per_token = 2 * kwargs["n_layers"] * kwargs["d_model"] * 4  # fp32 keys + values, all layers
    cached = path.startswith("kv")
    res["kv_cache_mb"] = batch * (s0 + frames) * kv_per_token / 2**20 if cached else 0.0
    # a cached step reads the keys/values of the whole prefix: on average s0 + frames / 2 positions
    res["kv_bytes_per_step"] = batch * (s0 + frames / 2) * kv_per_token if cached else 0
    res["load_average"] = [load0, load_average()]
    return res


def run_one_cell(cell: dict, threads: int) -> dict:
    global DATA
    set_threads(threads)
    DATA = Path(cell.pop("data"))
    kind = cell.pop("kind")
    return {"bandwidth": cell_bandwidth, "verify": cell_verify, "gen": cell_gen}[kind](
        **({"threads": threads} if kind == "bandwidth" else cell)
    )


# ---------------------------------------------------------------------------- driver
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run: fewer frames and steps")
    parser.add_argument(
        "--paper-full-b16",
        action="store_true",
        help="also the paper config's full recompute at batch 16 (+2 min)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--out", type=result_stem, default="generation", help="results file stem under bench/results/")
    parser.add_argument(
        "--data", default=str(ROOT / "data"), help="pipeline outputs: bpe/, codebook/, features/"
    )
    parser.add_argument(
        "--clock",
        choices=CLOCKS,
        default=clock_name(),
        help="wall (default) or cpu: CPU seconds, immune to time-slicing on a loaded machine (use with --threads 1)",
    )
    parser.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # internal: one measurement
    args = parser.parse_args(argv)
    use_clock(args.clock)
    if args.cell:
        emit(run_one_cell(json.loads(args.cell), args.threads))
        return 0

    import torch

    threads = args.threads or torch.get_num_threads()
    data = str(Path(args.data).resolve())
    r = reduction_factor()
    frames = math.ceil(AUDIO_SECONDS * FRAME_RATE / r)  # 313 grouped frames at r=2
    audio_s = frames * r / FRAME_RATE
    mod = "bench.generation"
    q = args.quick
    tiny_frames = 64 if q else frames
    # (config, path, batch, mode, steps per extrapolation point, repeats)
    plan = [
        ("tiny", "kv", 1, "measured", 0, 3),
        ("tiny", "kv", 16, "measured", 0, 3),
        ("tiny", "full", 1, "measured", 0, 1 if q else 2),
        ("tiny", "full", 16, "extrapolated", 4 if q else 8, 1),
        ("paper", "kv", 1, "extrapolated", 8 if q else 24, 1),
        ("paper", "kv", 16, "extrapolated", 6 if q else 16, 1),
        ("paper", "full", 1, "extrapolated", 2 if q else 3, 1),
    ]
    if args.paper_full_b16 and not q:  # ~2 min of CPU on its own: a 7k-token prefix re-run per step
        plan.append(("paper", "full", 16, "extrapolated", 1, 1))

    info = machine_info(threads)
    print(
        f"# generation benchmark: r={r}, {frames} grouped frames = {audio_s:.3f} s of audio per utterance, "
        f"{threads} torch thread(s), load average {info['load_average_at_start']}",
        flush=True,
    )
    t_all = time.perf_counter()
    bw = [run_cell(mod, {"data": data, "kind": "bandwidth"}, threads)]
    print(
        f"memory bandwidth: read {bw[0]['read_gbs']:.2f} GB/s, copy {bw[0]['copy_gbs_read_plus_write']:.2f} GB/s (r+w)",
        flush=True,
    )
    verify = [
        run_cell(
            mod,
            {
                "data": data,
                "kind": "verify",
                "config": "tiny",
                "batch": 4,
                "frames": tiny_frames,
                "paths": ["full"],
            },
            threads,
        ),
        run_cell(
            mod,
            {
                "data": data,
                "kind": "verify",
                "config": "paper",
                "batch": 2,
                "frames": 4 if q else 8,
                "paths": ["full"],
            },
            threads,
        ),
    ]
    for v in verify:
        for path, c in v["paths"].items():
            print(
                f"verify {v['config']} batch {v['batch']} x {v['frames']} frames, {path} vs kv: same codes = "
                f"{c['same_codes']}, max |frame diff| = {c['max_abs_frame_diff']:.2e}",
                flush=True,
            )

    rows = []
    for config, path, batch, mode, steps, repeats in plan:
        n = tiny_frames if config == "tiny" else frames
        cell = {
            "data": data,
            "kind": "gen",
            "config": config,
            "path": path,
            "batch": batch,
            "frames": n,
            "mode": mode,
            "steps": steps,
            "repeats": repeats,
        }
        res = run_cell(mod, cell, threads)
        res["audio_s_per_utt"] = n * r / FRAME_RATE
        res["steps_per_s"] = n / res["wall_s"]
        res["utt_per_s"] = batch / res["wall_s"]
        res["rtf"] = res["wall_s"] / (batch * res["audio_s_per_utt"])
        rows.append(res)
        print(
            f"  {config:5s} {path:9s} b{batch:<2d} {mode}: {res['wall_s']:.2f} s, step {res['step_median_s'] * 1e3:.2f} ms",
            flush=True,
        )
    bw.append(run_cell(mod, {"data": data, "kind": "bandwidth"}, threads))
    read_gbs = max(b["read_gbs"] for b in bw)
    for res in rows:
        res["bandwidth_floor_ms"] = res["weight_bytes_per_step"] / (read_gbs * 1e9) * 1e3
        res["step_over_floor"] = res["step_median_s"] * 1e3 / res["bandwidth_floor_ms"]
        res["floor_incl_kv_ms"] = (
            (res["weight_bytes_per_step"] + res["kv_bytes_per_step"]) / (read_gbs * 1e9) * 1e3
        )
        res["step_ms"] = res["step_median_s"] * 1e3
        res["peak_mb"] = res["peak_rss_delta_mb"]
        res["note"] = (
            "extrapolated" if res["mode"] == "extrapolated" else f"measured, best of {len(res['wall_all_s'])}"
        )

    def find(config, path, batch):
        return next((x for x in rows if (x["config"], x["path"], x["batch"]) == (config, path, batch)), None)

    targets = []
    for config in ("tiny", "paper"):
        for batch in (1, 16):
            kv, full = find(config, "kv", batch), find(config, "full", batch)
            if kv and full:
                goal = config == "tiny" and batch == 1
                targets.append(
                    {
                        "target": f"{config} b{batch}: KV-cached speed-up over full recompute ({kv['audio_s_per_utt']:.0f} s of audio)",
                        "value": full["wall_s"] / kv["wall_s"],
                        "goal": ">= 10" if goal else "-",
                        "met": full["wall_s"] / kv["wall_s"] >= 10 if goal else None,
                    }
                )
        b1, b16 = find(config, "kv", 1), find(config, "kv", 16)
        if b1 and b16:
            ratio = b16["utt_per_s"] / b1["utt_per_s"]
            goal = config == "tiny"
            targets.append(
                {
                    "target": f"{config} kv: batch-16 / batch-1 utterances/s",
                    "value": ratio,
                    "goal": ">= 6" if goal else "-",
                    "met": ratio >= 6 if goal else None,
                }
            )
    p1 = find("paper", "kv", 1)
    if p1:
        targets.append(
            {
                "target": "paper kv b1: step / bandwidth floor",
                "value": p1["step_over_floor"],
                "goal": "<= 3",
                "met": p1["step_over_floor"] <= 3,
            }
        )
    checks = [
        {
            "row": f"tiny {x['path']} b{x['batch']}",
            "measured_s": x["wall_s"],
            "trapezoid_s": x["trapezoid_estimate_s"],
            "error": x["trapezoid_estimate_s"] / x["wall_s"] - 1,
        }
        for x in rows
        if "trapezoid_estimate_s" in x
    ]

    cols = [
        ("config", "config"),
        ("path", "path"),
        ("batch", "batch"),
        ("frames", "frames"),
        ("wall_s", "wall s"),
        ("steps_per_s", "steps/s"),
        ("utt_per_s", "utt/s"),
        ("rtf", "RTF"),
        ("step_ms", "step ms (median)"),
        ("bandwidth_floor_ms", "BW floor ms"),
        ("step_over_floor", "step/floor"),
        ("floor_incl_kv_ms", "floor incl. KV ms"),
        ("peak_mb", "peak RSS Δ MB"),
        ("kv_cache_mb", "KV cache MB"),
        ("note", "note"),
    ]
    print()
    print(table(rows, cols))
    print()
    print(table(targets, [("target", "target"), ("value", "value"), ("goal", "goal"), ("met", "met")]))
    print()
    print("trapezoid extrapolation checked on the tiny config's measured runs:")
    print(
        table(
            checks,
            [
                ("row", "run"),
                ("measured_s", "measured s"),
                ("trapezoid_s", "trapezoid s"),
                ("error", "rel. error"),
            ],
        )
    )
    print()
    print(f"bandwidth (GB/s): {json.dumps(bw)}")
    print(
        f"weights read per step: tiny {find('tiny', 'kv', 1)['weight_bytes_per_step'] / 2**20:.1f} MiB, "
        f"paper {p1['weight_bytes_per_step'] / 2**20:.1f} MiB (fp32); floor uses the best read bandwidth {read_gbs:.2f} GB/s"
    )
    print(
        "floor incl. KV = (weights + the fp32 keys/values a cached step reads, averaged over the run) / bandwidth "
        "(loose: part of the cache can stay in L3)"
    )
    print(
        "peak RSS Δ = high-water RSS (VmHWM) of the timed runs (a fresh process per cell) minus the RSS just before them; "
        "extrapolated rows: the end point's runs count from their first step (their long prefill is no real run's)"
    )
    info["load_average_at_end"] = load_average()
    path = write_result(
        args.out,
        {
            "benchmark": "generation",
            "quick": q,
            "machine": info,
            "data": data,
            "reduction_factor": r,
            "frames": frames,
            "audio_seconds": audio_s,
            "sampling": sampling_params(),
            "bandwidth": bw,
            "read_gbs_for_floor": read_gbs,
            "verify": verify,
            "rows": rows,
            "targets": targets,
            "extrapolation_check": checks,
            "unmeasured": [] if args.paper_full_b16 and not q else ["paper full b16"],
            "seconds": time.perf_counter() - t_all,
            "memory_method": "VmHWM of the timed runs (fresh process per cell, restarted before them) minus RSS "
            "before them; extrapolated rows: max of the start runs and the end runs from their first step",
        },
    )
    print(f"wrote {path.relative_to(ROOT)} in {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
