"""Issue 6's GPU rows in one run: MELD generation (RTF, ms/step) and training (MFU), tiny and paper configs.

Made to run on a lent GPU machine inside a short lease, with nothing installed: it needs torch, numpy
and PyYAML only (no pipeline outputs, no audio libraries), so inputs are synthetic. Speed does not
depend on content here: <EOS> is masked so every generation runs its full length, and a training step
costs the same for any frames and text of the same shapes.

What it measures (``--device cuda``; ``--device cpu`` runs the same code, for the test suite):

* the device: name, a matrix product's TFLOP/s in bf16 and in fp32 (8192³ on GPU), a
  device-to-device copy's bandwidth (bytes read + written per second) and a read's (a ``torch.sum``
  of 1 GiB of float32 on GPU: bytes read per second), all measured here;
* generation, 10 s of speech per utterance (313 grouped frames at r=2) after a 3 s prompt (94 grouped
  frames), batch 1 and 16, float32 weights: the default sliced decoding step and the compiled
  fixed-shape step (``configure_decoding(compile=True)``: CUDA graphs on GPU); seconds per batch,
  ms per step, RTF (seconds of compute per second of speech, whole batch), peak device memory, and
  the weight-bandwidth floor of a batch-1 step (bytes of weights a step reads / the measured read
  rate, a large ``torch.sum``, as ``bench.generation`` takes it); for the compiled step, how many
  graphs were compiled during the timed rounds (0 unless a generation recompiles) and how many times
  inductor fell back from CUDA graphs (``cudagraph_skips``: such a row did not time CUDA graphs), and
  whether a CUDA graph was recorded during the timed rounds (``graphs_recorded_in_timed_rounds``:
  true means a round paid a recording, e.g. its KV cache at a new address, so it timed more than replays);
* training, ``meld.training.train_step`` with bf16 autocast and the fused AdamW on GPU (the Ray
  driver's settings), on a synthetic batch filling a frame budget (utterances of 4–16 s, sorted and
  packed as the frame-budget sampler packs them). The paper config trains as ``configs/paper.yaml``
  says (its own frame grouping, r=1) at two budgets: one worker's share (3,125 frames: what each of
  the run's 16 GPUs does per step) and the whole 50k-frame global batch on this one GPU (what a
  bigger per-GPU batch would gain). Seconds per step, real tokens/s, padding, peak
  memory, and MFU two ways: FLOPs counted by ``torch.utils.flop_counter`` on one step (executed
  FLOPs, padding included; the CPU's attention kernel is not counted there) and the PaLM estimate
  (6 × matmul parameters + 12 × layers × width × sequence length, per real token); each divided by
  the step time and by the device's bf16 peak (the vendor's dense figure for the card: H100/H200 SXM
  989 TFLOP/s, NVL 835, H100 PCIe 756; or ``--peak-tflops``), and also by the measured matrix-product
  rate of the dtype the step ran in (bf16 under autocast on GPU; fp32 on CPU, where the step runs
  without autocast).

Rows run most-wanted first (:func:`plan`: the paper config's batch-1 RTF, then its training MFU, ...)
and the result file is rewritten after each (also into ``--copy-to DIR``: the device tool's $OUT,
which comes back even when the command is killed), so a lease that ends early keeps what was measured;
``--deadline-s`` starts no new row after that many seconds and lists the rest as not run. A row that
fails (any exception: a compiler missing, an out-of-memory the training budget halving cannot cure)
is kept as a row with its ``error`` and the run goes on to the next.

Run (from the repository root; on a machine with only torch, numpy and PyYAML: ``PYTHONPATH=.``):
    timeout 560 python -m bench.gpu --device cuda --deadline-s 420 --out gpu-h100 --copy-to $OUT   # ~3-6 min on an H100
    python -m bench.gpu --device cpu --quick --out gpu-cpu-smoke
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (  # noqa: E402
    ROOT,
    fmt,
    machine_info,
    paper_frames_per_batch,
    paper_frames_per_worker,
    paper_meld_kwargs,
    result_stem,
    table,
    write_result,
)

FRAMES = 313  # 10 s of speech at r = 2
PROMPT = 94  # 3 s prompt, grouped frames at r = 2
SPEECH_SECONDS = 10.0
FRAME_RATE = 62.5  # mel frames per second
TINY_TEXT, TINY_CODES = 256, 256  # the mini corpus's BPE and codebook sizes
# vendor dense bf16 TFLOP/s (half the with-sparsity figure of the datasheets), by form factor: the name
# torch reports says which ("NVIDIA H100 80GB HBM3" is an SXM card, "NVIDIA H100 PCIe", "NVIDIA H200 NVL")
PEAK_BF16_TFLOPS = {"SXM": {"H100": 989.4, "H200": 989.4}, "PCIe": {"H100": 756.0},
                    "NVL": {"H100": 835.5, "H200": 835.5}}


# ---------------------------------------------------------------------------- device
def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> tuple[object, float]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def device_rates(device, quick: bool) -> dict:
    """Measured matrix-product TFLOP/s in bf16 and in fp32 (a training step's MFU is read against the
    rate of the dtype its matmuls ran in: bf16 autocast on GPU, fp32 on CPU) and copy bandwidth (GB/s,
    read + write)."""
    import torch

    n = 1024 if quick or device.type != "cuda" else 8192
    reps = 3 if quick else 10
    rates = {"matmul_n": n}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(3):
            a @ b
        _, s = timed(lambda a=a, b=b: [a @ b for _ in range(reps)], device)
        rates[f"matmul_{name}_tflops"] = 2 * n**3 * reps / s / 1e12
    x = torch.empty(256 * 2**20 if device.type == "cuda" and not quick else 16 * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    _, s = timed(lambda: [y.copy_(x) for _ in range(reps)], device)
    rates["copy_gbs_read_plus_write"] = 2 * x.numel() * reps / s / 1e9
    # what a decoding step does with its weights is read them: a copy's read + write rate is not that
    # rate (on HBM a read alone runs at about the copy's read + write total, not at half of it)
    # 1 GiB on a GPU (20x an H100's L2), 256 MiB on a CPU, 16 MiB in a smoke run
    f = torch.ones(2**22 if quick else 2**28 if device.type == "cuda" else 2**26, dtype=torch.float32, device=device)
    f.sum()
    _, s = timed(lambda: [f.sum() for _ in range(reps)], device)
    rates["read_gbs"] = f.numel() * f.element_size() * reps / s / 1e9
    return rates


def peak_tflops(device, given: float | None) -> float | None:
    import torch

    if given:
        return given
    if device.type != "cuda":
        return None
    return bf16_peak_tflops(torch.cuda.get_device_name(device))


def bf16_peak_tflops(name: str) -> float | None:
    """The dense bf16 peak of the GPU ``name`` (as ``torch.cuda.get_device_name`` gives it), or None for
    a card not in :data:`PEAK_BF16_TFLOPS`: an MFU against another card's peak would be wrong (an NVL
    card read against the SXM figure, as this once did, 16 % low)."""
    form = next((f for f in ("PCIe", "NVL") if f in name), "SXM")
    return next((v for chip, v in PEAK_BF16_TFLOPS[form].items() if chip in name), None)


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def allocated(device) -> int:
    import torch

    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def peak_mb(device, resident_before: int, own: int = 0) -> float | None:
    """One row's peak device memory, in MiB: the peak since :func:`reset_peak` minus what was allocated
    before the row (``resident_before``: the other rows' models, which this process keeps), plus
    ``own`` bytes of the row's that were already allocated then (its model's weights)."""
    import torch

    if device.type != "cuda":
        return None
    return (torch.cuda.max_memory_allocated(device) - resident_before + own) / 2**20


def release(device) -> None:
    """Free what earlier rows left unreachable before a row reads its baseline: an optimiser and its
    LR scheduler hold each other (the scheduler wraps ``optimizer.step``), so a training row's
    parameters, gradients and AdamW state outlive it until the cyclic collector runs, which it may do
    in the middle of a later row (that row's peak, less a baseline that still held them, then reads
    low) or not at all before an out-of-memory retry (which then has less room than it should)."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def inductor_counts() -> tuple[int, int, int]:
    """(graphs dynamo has compiled, times inductor fell back from CUDA graphs, a count that grows with
    each CUDA graph recorded) so far in this process. The last is torch's tally of non-static inputs
    over recorded graphs: its size means nothing, only whether it moved."""
    from torch._dynamo.utils import counters

    return (counters["stats"]["unique_graphs"], counters["inductor"]["cudagraph_skips"],
            counters["inductor"]["cudagraph_recorded_non_static_inputs"])


def tensor_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


# ---------------------------------------------------------------------------- models
def model_kwargs(config: str, *, training: bool = False) -> dict:
    """MELD constructor kwargs: ``tiny`` = params.yaml's model section with the mini corpus's sizes,
    ``paper`` = configs/paper.yaml's 186M configuration, for generation at the tiny config's frame
    grouping (10 s = 313 steps in both), for training at its own (what a paper run trains)."""
    import yaml

    from meld.config import ModelConfig
    from meld.models.builders import meld_kwargs

    cfg = ModelConfig.from_dict(yaml.safe_load((ROOT / "params.yaml").read_text())["model"], "model")
    if config == "tiny":
        return meld_kwargs(cfg, n_text=TINY_TEXT, codebook_size=TINY_CODES)
    if config == "paper":
        return paper_meld_kwargs(None if training else cfg.reduction_factor)
    raise ValueError(f"config must be tiny or paper, got {config!r}")


def build(config: str, device, *, no_eos: bool, training: bool = False):
    import torch

    from bench import generation as G
    from meld.models.meld import MELD

    kwargs = model_kwargs(config, training=training)
    torch.manual_seed(0)
    codebook = torch.randn(kwargs["codebook_size"], kwargs["frame_dim"])
    if no_eos:
        return G.no_eos_meld(kwargs, codebook).to(device), kwargs
    model = MELD(**kwargs)
    model.set_codebook(codebook)
    return model.to(device), kwargs


def weight_bytes_per_step(model) -> int:
    from bench import generation as G

    return G.weight_bytes_per_step(model)


# ---------------------------------------------------------------------------- generation
def generation_inputs(batch: int, n_text: int, frame_dim: int, device, seed: int = 0):
    """Text of 40-80 tokens per row (different lengths: a padded batch) and 3 s prompts."""
    import torch

    g = torch.Generator().manual_seed(seed)
    text_len = torch.randint(40, 81, (batch,), generator=g)
    text = torch.randint(0, n_text, (batch, int(text_len.max())), generator=g)
    prompt = torch.randn(batch, PROMPT, frame_dim, generator=g)
    prompt_len = torch.full((batch,), PROMPT)
    return tuple(t.to(device) for t in (text, text_len, prompt, prompt_len))


class GenerationBench:
    """Generation rows one at a time, in any order: models are built on first use (one copy per
    decoding mode, each configured once), and each batch's codes are kept so a later mode's row can
    say whether it decoded what the sliced step did."""

    def __init__(self, device, frames: int, rounds: int, bandwidth_gbs: float):
        """``bandwidth_gbs``: the device's measured read rate (bytes read per second / 1e9)."""
        self.device, self.frames, self.rounds, self.bandwidth_gbs = device, frames, rounds, bandwidth_gbs
        self.models: dict[tuple[str, str], object] = {}
        self.bases: dict[str, tuple] = {}
        self.codes: dict[tuple[str, int, str], list] = {}

    def _model(self, config: str, mode: str):
        from meld.models.backbone import configure_decoding

        if config not in self.bases:
            base, kwargs = build(config, self.device, no_eos=True)
            floor_ms = 1e3 * weight_bytes_per_step(base) / (self.bandwidth_gbs * 1e9)  # bytes read / read rate
            self.bases[config] = (base, kwargs, floor_ms)
        if (config, mode) not in self.models:
            model = copy.deepcopy(self.bases[config][0])
            configure_decoding(model, compile=mode == "compiled", fixed_shape=mode == "fixed")
            self.models[config, mode] = model
        return self.models[config, mode], self.bases[config][1], self.bases[config][2]

    def row(self, config: str, mode: str, b: int) -> dict:
        """One row; any exception (building or configuring the model, the first call, a timed round)
        becomes the row's ``error``: a lease is short, and one mode that fails must not take the rest."""
        try:
            return self._row(config, mode, b)
        except Exception as err:
            print(f"generation {config} {mode} b{b} failed: {type(err).__name__}: {err}", flush=True)
            return {"config": config, "mode": mode, "batch": b, "error": f"{type(err).__name__}: {err}"[:2000]}

    def _row(self, config: str, mode: str, b: int) -> dict:
        from bench import generation as G

        release(self.device)
        model, kwargs, floor_ms = self._model(config, mode)
        x = generation_inputs(b, kwargs["n_text"], kwargs["frame_dim"], self.device)
        frames, device = self.frames, self.device

        def run():
            return G.run_path(model, "kv", x, frames, seed=0)[0]

        resident = allocated(device)  # every model built so far, this one included
        reset_peak(device)
        graphs0, skips0, _ = inductor_counts()
        gen, first = timed(run, device)  # the compiled mode compiles (and records its CUDA graph) here
        self.codes[config, b, mode] = gen.codes
        graphs1, _, recorded1 = inductor_counts()
        best = min(timed(run, device)[1] for _ in range(self.rounds))
        graphs2, skips2, recorded2 = inductor_counts()
        speech = SPEECH_SECONDS * frames / FRAMES
        sliced = self.codes.get((config, b, "sliced"))
        print(f"generation {config} {mode} b{b}: first {first:.2f} s, best {best:.3f} s", flush=True)
        return {
            "config": config, "mode": mode, "batch": b, "frames": frames, "first_s": first, "s_per_batch": best,
            "ms_per_step": 1e3 * best / frames, "utt_per_s": b / best, "rtf": best / (speech * b),
            "peak_mb": peak_mb(device, resident, own=tensor_bytes(model)), "floor_ms": floor_ms if b == 1 else None,
            "step_vs_floor": 1e3 * best / frames / floor_ms if b == 1 else None,
            "same_codes_as_sliced": None if sliced is None or mode == "sliced" else gen.codes == sliced,
            # a timed round that compiled, or a step inductor ran without CUDA graphs, times something else
            "compiles_in_timed_rounds": graphs2 - graphs1, "cudagraph_skips": skips2 - skips0,
            "graphs_recorded_in_timed_rounds": recorded2 != recorded1,
        }


# ---------------------------------------------------------------------------- training
def training_batch(budget: int, n_text: int, frame_dim: int, device, seed: int = 0) -> dict:
    """Utterances of 4-16 s, sorted by length and packed while batch x longest <= ``budget`` grouped
    frames (how the frame-budget sampler fills a batch); text at 4.5 tokens per second."""
    import torch

    g = torch.Generator().manual_seed(seed)
    r = frame_dim // 80
    seconds = sorted((4 + 12 * torch.rand(4096, generator=g)).tolist(), reverse=True)
    start = int(torch.randint(0, 2048, (1,), generator=g))
    lengths = []
    for s in seconds[start:]:
        n = max(1, round(s * FRAME_RATE / r))
        if n > budget:  # longer than the whole budget: the sampler would refuse it too
            continue
        if (len(lengths) + 1) * max(lengths + [n]) > budget:
            break
        lengths.append(n)
    if not lengths:
        raise ValueError(f"a frame budget of {budget} holds no utterance of 4-16 s at r={r}")
    mel_len = torch.tensor(lengths)
    text_len = (mel_len.float() * r / FRAME_RATE * 4.5).round().long().clamp_min(1)
    batch = {
        "mel": torch.randn(len(lengths), max(lengths), frame_dim, generator=g),
        "mel_len": mel_len,
        "text": torch.randint(0, n_text, (len(lengths), int(text_len.max())), generator=g),
        "text_len": text_len,
    }
    return {k: v.to(device) for k, v in batch.items()}


def palm_flops_per_step(model, kwargs: dict, batch: dict) -> float:
    """6 x matmul parameters x real tokens + 12 x layers x width x sequence length x real tokens (PaLM's
    model FLOPs: forward and backward, no recomputation). A token is a text token or a grouped frame;
    the token embedding is a lookup, not a matmul, so it is left out."""
    n_matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith("token_emb."))
    seq = batch["text_len"] + batch["mel_len"] + 2  # <TTS>-style separators: a rounding error either way
    tokens = float(seq.sum())
    attention = 12 * kwargs["n_layers"] * kwargs["d_model"] * float((seq.float() ** 2).sum())
    return 6 * n_matmul * tokens + attention


def training_row(config: str, device, budget: int, steps: int, warmup: int) -> dict:
    import torch
    import yaml
    from torch.utils.flop_counter import FlopCounterMode

    from meld.training import build_optimizer, build_scheduler, train_step

    tc = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]
    release(device)
    resident = allocated(device)  # the generation rows' models, still held: not this row's memory
    model, kwargs = build(config, device, no_eos=False, training=True)
    on_gpu = device.type == "cuda"
    opt = build_optimizer(model, tc["lr"], tc["weight_decay"], fused=on_gpu)
    sched = build_scheduler(opt, 1, 10**6, 0)  # a constant rate: the schedule costs nothing either way
    autocast = torch.bfloat16 if on_gpu else None
    batch = training_batch(budget, kwargs["n_text"], kwargs["frame_dim"], device)

    def step():
        return train_step(model, opt, sched, batch, task="tts", loss_weights=tc["loss_weights"],
                          grad_clip=tc["grad_clip"], autocast_dtype=autocast)

    for _ in range(warmup):
        step()
    with FlopCounterMode(display=False) as counter:
        step()
    counted = counter.get_total_flops()
    reset_peak(device)
    times = [timed(step, device)[1] for _ in range(steps)]
    s = min(times)
    real = int(batch["mel_len"].sum() + batch["text_len"].sum())
    padded = batch["mel"].shape[0] * (batch["mel"].shape[1] + batch["text"].shape[1])
    palm = palm_flops_per_step(model, kwargs, batch)
    return {
        "config": config, "params": sum(p.numel() for p in model.parameters()), "budget": budget,
        "reduction_factor": kwargs["frame_dim"] // 80,
        "batch": batch["mel"].shape[0], "longest": batch["mel"].shape[1], "s_per_step": s,
        "median_s_per_step": sorted(times)[len(times) // 2], "real_tokens_per_s": real / s,
        "mel_frames_per_s": float(batch["mel_len"].sum()) * (kwargs["frame_dim"] // 80) / s,  # grouped x r
        "padding": 1 - real / padded, "peak_mb": peak_mb(device, resident), "counted_tflop_per_step": counted / 1e12,
        "palm_tflop_per_step": palm / 1e12, "counted_tflops": counted / s / 1e12, "palm_tflops": palm / s / 1e12,
        "autocast": str(autocast), "matmul_dtype": "bf16" if autocast is torch.bfloat16 else "fp32",
        "fused_adamw": on_gpu,
    }


def training_task(config: str, device, budget: int, args, rates: dict, peak: float | None) -> dict:
    """One training row, its budget halved until it fits the device, with its MFU filled in; any other
    failure (or a budget too small to hold an utterance) becomes the row's ``error``, and the run goes on."""
    import torch

    asked = budget
    while True:
        try:
            row = training_row(config, device, budget, args.steps, warmup=1 if args.quick else 3)
            break
        except torch.OutOfMemoryError:
            print(f"training {config}: budget {budget} ran out of device memory; halving it", flush=True)
            budget //= 2
        except Exception as err:  # a lease is short: the rows after this one must still run
            print(f"training {config} budget {budget} failed: {type(err).__name__}: {err}", flush=True)
            return {"config": config, "budget": budget, "budget_asked": asked,
                    "error": f"{type(err).__name__}: {err}"[:2000]}
        release(device)  # outside the handler: the failed attempt's tensors are unreachable only now
    row["budget_asked"] = asked
    if config == "paper":
        row["batch_of"] = {paper_frames_per_worker(): "one worker's share",
                           paper_frames_per_batch(): "the whole global batch"}.get(budget, "")
    for key in ("counted", "palm"):
        row[f"mfu_{key}"] = row[f"{key}_tflops"] / peak if peak else None
        # against the measured rate of the dtype the step's matmuls ran in (device_rates' names)
        row[f"mfu_{key}_vs_measured_matmul"] = row[f"{key}_tflops"] / rates[f"matmul_{row['matmul_dtype']}_tflops"]
    print(f"training {config} budget {row['budget']}: {row['s_per_step']:.3f} s/step, {row['palm_tflops']:.3g} "
          f"TFLOP/s (PaLM), {row['counted_tflops']:.3g} TFLOP/s (counted)", flush=True)
    return row


# ---------------------------------------------------------------------------- order
MODES = ("sliced", "fixed", "compiled")


def plan(configs: list[str], modes: list[str], batches: list[int], budgets: dict[str, list[int]],
         skip: set[str] = frozenset()) -> list[tuple]:
    """The rows to measure, most wanted first, so a lease that ends early has the ones issue 6 asks for.

    Paper config first: its batch-1 generation with the first mode (the issue's RTF), then its
    training budgets (the MFU), then its other batch sizes; then the tiny config the same way; then
    every other decoding mode (each after its batch's first-mode row, which its codes are checked
    against); the tiny config's training last.
    """
    ordered = sorted(configs, key=lambda c: c != "paper")
    gen, train = "generation" not in skip, "training" not in skip
    tasks: list[tuple] = []
    for c in ordered:
        if gen:
            tasks.append(("generation", c, modes[0], batches[0]))
        if train and c == "paper":
            tasks += [("training", c, b) for b in budgets[c]]
        if gen:
            tasks += [("generation", c, modes[0], b) for b in batches[1:]]
    if gen:
        tasks += [("generation", c, m, b) for c in ordered for m in modes[1:] for b in batches]
    if train:
        tasks += [("training", c, b) for c in ordered if c != "paper" for b in budgets[c]]
    return tasks


# ---------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (what this is for) or cpu (a smoke run)")
    p.add_argument("--configs", default="tiny,paper")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--modes", default="sliced,compiled", help="decoding steps: sliced, fixed, compiled")
    p.add_argument("--frames", type=int, default=FRAMES)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--budgets", default=f"{paper_frames_per_worker()},{paper_frames_per_batch()}",
                   help="training budgets of the paper config, frames per step on this device (default: "
                   "configs/paper.yaml's per worker, then its whole global batch)")
    p.add_argument("--tiny-budget", type=int, default=2500, help="training budget of the tiny config (params.yaml)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps (best and median kept)")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak of the device, for MFU")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: generation, training")
    p.add_argument("--deadline-s", type=float, default=0,
                   help="start no new row after this many seconds (0: none); the rows left are listed as not run")
    p.add_argument("--quick", action="store_true", help="smoke run: 8 frames, batch 1 and 2, 1 round, small budgets")
    p.add_argument("--out", type=result_stem, default="gpu")
    p.add_argument("--copy-to", type=Path, default=None,
                   help="also copy the result file here after every row (the device tool's $OUT: what is "
                   "there comes back even when the command is killed at its limit)")
    args = p.parse_args(argv)
    if args.quick:
        args.frames, args.batches, args.rounds, args.steps = 8, "1,2", 1, 1
        args.budgets = ",".join(str(min(int(b), 600)) for b in args.budgets.split(","))
        args.tiny_budget = min(args.tiny_budget, 600)

    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run with --device cpu for a smoke run", file=sys.stderr)
        return 2
    configs = [c for c in args.configs.split(",") if c]
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES)) + sorted(set(configs) - {"tiny", "paper"})
    if unknown:
        p.error(f"unknown mode or config {unknown}; modes: {', '.join(MODES)}; configs: tiny, paper")
    skip = set(filter(None, args.skip.split(",")))
    budgets = {"tiny": [args.tiny_budget], "paper": sorted({int(b) for b in args.budgets.split(",")})}
    tasks = plan(configs, modes, [int(b) for b in args.batches.split(",")], budgets, skip)
    info = machine_info(torch.get_num_threads())
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    started = time.perf_counter()
    rates = device_rates(device, args.quick)
    peak = peak_tflops(device, args.peak_tflops)
    print(f"device {info.get('gpu', 'cpu')}: matmul {rates['matmul_bf16_tflops']:.2f} TFLOP/s bf16, "
          f"{rates['matmul_fp32_tflops']:.2f} fp32 (n={rates['matmul_n']}), "
          f"copy {rates['copy_gbs_read_plus_write']:.0f} GB/s (read + write), read {rates['read_gbs']:.0f} GB/s, "
          f"peak for MFU {peak} TFLOP/s", flush=True)
    result = {"device": str(device), "rates": rates, "peak_tflops": peak, "machine": info,
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "generation": [], "training": [], "not_run": []}
    generation = GenerationBench(device, args.frames, args.rounds, rates["read_gbs"])

    def save() -> Path:
        return write_result(args.out, result, also=args.copy_to)

    save()  # the device's rates, before any row
    for i, task in enumerate(tasks):
        if args.deadline_s and time.perf_counter() - started > args.deadline_s:
            result["not_run"] = [list(t) for t in tasks[i:]]
            print(f"deadline of {args.deadline_s:g} s passed: {len(tasks) - i} rows not run: {tasks[i:]}", flush=True)
            break
        if task[0] == "generation":
            result["generation"].append(generation.row(*task[1:]))
        else:
            result["training"].append(training_task(task[1], device, task[2], args, rates, peak))
        save()  # after every row: a lease that ends early keeps what was measured

    print(table(result["generation"], [
        ("config", "config"), ("mode", "step"), ("batch", "batch"), ("first_s", "first s"),
        ("s_per_batch", "s per batch"), ("ms_per_step", "ms/step"), ("utt_per_s", "utt/s"), ("rtf", "RTF"),
        ("floor_ms", "BW floor ms"), ("step_vs_floor", "step/floor"), ("peak_mb", "peak MB"),
        ("same_codes_as_sliced", "same codes"), ("compiles_in_timed_rounds", "compiles in timed"),
        ("cudagraph_skips", "CUDA-graph skips"), ("graphs_recorded_in_timed_rounds", "recorded in timed"),
        ("error", "error")]))
    print(table(result["training"], [
        ("config", "config"), ("params", "params"), ("reduction_factor", "r"), ("budget", "budget"),
        ("batch_of", "budget is"), ("batch", "batch"), ("s_per_step", "s/step"),
        ("real_tokens_per_s", "real tokens/s"), ("padding", "padding"), ("peak_mb", "peak MB"),
        ("palm_tflops", "TFLOP/s (PaLM)"), ("mfu_palm", "MFU (PaLM)"), ("counted_tflops", "TFLOP/s (counted)"),
        ("mfu_counted", "MFU (counted)"), ("mfu_palm_vs_measured_matmul", "PaLM / measured matmul"),
        ("error", "error")]))
    path = save()
    print(f"\nwrote {path} ({fmt(info.get('gpu', info['cpu_model']))}) in {time.perf_counter() - started:.0f} s")
    print("RESULT_JSON " + json.dumps({k: result[k] for k in ("device", "rates", "peak_tflops")}, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
