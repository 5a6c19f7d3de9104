"""Sharded evaluation decoding (evaluate.decode_workers): a list decoded in parts, or over Ray actors,
gives what one call over the whole list gives."""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import tiny_meld

from meld.codes import continue_codes
from meld.generate import stt_beam_search, tts_continue
from meld.training import save_checkpoint

REDUCTION = 2
BATCH = 2


def _tts_inputs(n: int = 7):
    rng = np.random.default_rng(0)
    texts = [list(rng.integers(1, 20, 3 + i % 4)) for i in range(n)]
    prompts = [rng.standard_normal((2 * (1 + i % 3), 80)).astype(np.float32) for i in range(n)]
    return texts, prompts


# sampled, with test-time dropout: every batch draws from the random generators
GUARDS = [12, 20, 8, 16, 10, 14, 6]  # 80-dim frames, one per utterance
TTS_OPTIONS = dict(reduction=REDUCTION, temperature=1.0, top_k=8, top_p=0.95, repetition_penalty=1.2, seed=3)


def _same_continuations(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.codes == y.codes and x.hit_max_length == y.hit_max_length
        np.testing.assert_array_equal(x.frames, y.frames)


def test_a_list_generated_in_parts_at_batch_boundaries_equals_the_whole_list(one_thread):
    model, _ = tiny_meld(reduction=REDUCTION, encoder_dropout=0.5)
    model.eval()
    texts, prompts = _tts_inputs()
    whole = tts_continue(model, texts, prompts, max_frames=GUARDS, batch_size=BATCH, **TTS_OPTIONS)
    # batches 0-1 and 2-3 of the same list, each part told where it starts
    first = tts_continue(model, texts[:4], prompts[:4], max_frames=GUARDS[:4], batch_size=BATCH, first_batch=0,
                         **TTS_OPTIONS)
    rest = tts_continue(model, texts[4:], prompts[4:], max_frames=GUARDS[4:], batch_size=BATCH, first_batch=2,
                        **TTS_OPTIONS)
    _same_continuations(first + rest, whole)
    # the part's seeds come from its place in the list: told it starts at batch 0, it speaks otherwise
    misplaced = tts_continue(model, texts[4:], prompts[4:], max_frames=GUARDS[4:], batch_size=BATCH, first_batch=0,
                             **TTS_OPTIONS)
    assert [c.codes for c in misplaced] != [c.codes for c in rest]


def test_a_code_list_generated_in_parts_equals_the_whole_list(one_thread):
    from test_codec_lm import K, N, tiny_codec_lm

    model, _ = tiny_codec_lm()
    model.eval()
    rng = np.random.default_rng(1)
    texts = [list(rng.integers(1, 20, 4)) for _ in range(5)]
    prompts = [rng.integers(0, N, (n, K)) for n in (3, 2, 4, 1, 3)]
    options = dict(max_frames=9, temperature=1.0, top_k=8, top_p=0.95, seed=5)
    whole = continue_codes(model, texts, prompts, batch_size=BATCH, **options)
    parts = (continue_codes(model, texts[:2], prompts[:2], batch_size=BATCH, first_batch=0, **options)
             + continue_codes(model, texts[2:], prompts[2:], batch_size=BATCH, first_batch=1, **options))
    for a, b in zip(parts, whole):
        np.testing.assert_array_equal(a.codes, b.codes)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    model, kwargs = tiny_meld(reduction=REDUCTION, encoder_dropout=0.5)
    path = tmp_path_factory.mktemp("pool") / "model.pt"
    return save_checkpoint(path, system="meld", model=model, model_kwargs=kwargs, extra={"task": "joint"}), model


def test_decoding_sharded_over_ray_actors_equals_one_process(tiny_checkpoint, one_thread):
    from test_faults import ensure_ray

    from ray_jobs.decode_pool import DecodePool

    ensure_ray()  # the session's 2-CPU cluster: two one-core actors
    path, model = tiny_checkpoint
    model.eval()
    texts, prompts = _tts_inputs()
    rng = np.random.default_rng(2)
    mels = [rng.standard_normal((2 * n, 80)).astype(np.float32) for n in (9, 5, 12, 7, 10)]
    stt_options = dict(reduction=REDUCTION, beam_size=2, max_tokens=6)
    local_tts = tts_continue(model, texts, prompts, max_frames=GUARDS, batch_size=BATCH, **TTS_OPTIONS)
    local_stt = stt_beam_search(model, mels, batch_size=BATCH, **stt_options)
    with DecodePool(2, "cpu") as pool:
        tts_items = {"texts": texts, "prompts": prompts, "max_frames": GUARDS}
        start = time.perf_counter()
        sharded_tts = pool.map("tts_continue", str(path), tts_items, TTS_OPTIONS, batch_size=BATCH)
        wall = time.perf_counter() - start
        # each actor's decoding lies within the map's wall time: the sum is at most workers x wall
        assert 0 < pool.device_seconds <= 2 * wall
        assert sum(pool.tasks_run) == 4 and min(pool.tasks_run) >= 1  # 4 batches, one task each, on both actors
        sharded_stt = pool.map("stt_beam_search", str(path), {"mels": mels}, stt_options, batch_size=BATCH)
        with pytest.raises(ValueError, match="lists of different lengths"):
            pool.map("tts_continue", str(path), tts_items | {"prompts": prompts[:3]}, TTS_OPTIONS, batch_size=BATCH)
    _same_continuations(sharded_tts, local_tts)
    assert sharded_stt == local_stt


@pytest.mark.parametrize("first", [False, True])
def test_an_actor_decoding_one_checkpoint_two_ways_holds_one_set_of_weights(tiny_checkpoint, first):
    """A joint model's TTS side compiled (``evaluate.compile_decoding``) and its STT side not: two
    modules with their own decoding settings over the same tensors, whichever is asked for first."""
    from meld.models.backbone import Backbone
    from ray_jobs.decode_pool import _Decoder

    path, _ = tiny_checkpoint
    actor = _Decoder("cpu", 1)
    a, b = actor._model(str(path), first), actor._model(str(path), not first)
    compiled, plain = (a, b) if first else (b, a)
    assert compiled is not plain and actor._model(str(path), first) is a
    assert [id(t) for t in compiled.parameters()] == [id(t) for t in plain.parameters()]
    assert all(m._compiled_step is not None for m in compiled.modules() if isinstance(m, Backbone))
    assert all(m._compiled_step is None and not m.fixed_shape_decoding
               for m in plain.modules() if isinstance(m, Backbone))


def test_code_generation_sharded_over_ray_actors_equals_one_process(tmp_path, one_thread):
    from test_codec_lm import K, N, tiny_codec_lm
    from test_faults import ensure_ray

    from meld.models.codec_lm import CodecLM
    from ray_jobs.decode_pool import DecodePool

    ensure_ray()
    model, kwargs = tiny_codec_lm()
    path = save_checkpoint(tmp_path / "codec_lm.pt", system=CodecLM.system, model=model, model_kwargs=kwargs)
    model.eval()
    rng = np.random.default_rng(4)
    items = {"texts": [list(rng.integers(1, 20, 4)) for _ in range(5)],
             "prompts": [rng.integers(0, N, (n, K)) for n in (3, 2, 4, 1, 3)], "max_frames": [9, 4, 7, 9, 5]}
    options = dict(temperature=1.0, top_k=8, top_p=0.95, seed=5)
    local = continue_codes(model, **items, batch_size=BATCH, **options)
    with DecodePool(2, "cpu") as pool:
        sharded = pool.map("continue_codes", str(path), items, options, batch_size=BATCH)
    assert len(sharded) == len(local)
    for a, b in zip(sharded, local):
        np.testing.assert_array_equal(a.codes, b.codes)
        assert a.hit_max_length == b.hit_max_length


def test_a_pool_the_cluster_cannot_hold_is_refused_with_the_numbers():
    import ray
    from test_faults import ensure_ray

    from ray_jobs.decode_pool import DecodePool, PoolRefused

    ensure_ray()
    cpus = int(ray.cluster_resources()["CPU"])
    with pytest.raises(PoolRefused, match=f"needs {cpus + 1} CPUs, one per worker; the Ray cluster has {cpus}"):
        DecodePool(cpus + 1, "cpu")
    if not ray.cluster_resources().get("GPU"):
        with pytest.raises(ValueError, match="needs 2 GPUs, one per worker; the Ray cluster has 0"):
            DecodePool(2, "cuda")
    for device in ("cuda:1", "mps"):  # one named device cannot be sharded over
        with pytest.raises(ValueError, match=f"needs device auto, cpu or cuda .* not {device}"):
            DecodePool(2, device)
    assert ray.is_initialized()  # the session's cluster: a refused pool does not shut down what it joined


def test_a_pool_whose_actors_cannot_all_start_is_refused_not_left_waiting():
    """Enough CPUs in all, but another job holds one: the pool must not hand a task to an actor that
    never starts (its map would wait forever); it gives up after its start timeout, with the numbers."""
    import ray
    from test_faults import ensure_ray

    from ray_jobs.decode_pool import DecodePool, PoolRefused

    ensure_ray()
    cpus = int(ray.cluster_resources()["CPU"])

    @ray.remote(num_cpus=cpus - 1)
    class Holder:
        def ready(self) -> bool:
            return True

    holder = Holder.remote()  # leaves one CPU free
    try:
        ray.get(holder.ready.remote())
        # one actor can start, but a loaded 2-core machine may not start even it (a new worker process
        # imports torch) within the timeout: 0 or 1 started, never both
        with pytest.raises(PoolRefused, match=f"only [01] of 2 actors started within 6 s; the cluster has {cpus} "
                                              "CPUs, 0 free now"):
            DecodePool(2, "cpu", start_timeout_s=6)
    finally:
        ray.kill(holder)


def test_decode_workers_is_checked_with_the_device():
    from meld.config import ConfigError, EvaluateConfig

    EvaluateConfig.from_dict({"decode_workers": 4, "device": "cuda"}, "evaluate")
    with pytest.raises(ConfigError, match="evaluate.device must be auto, cpu or cuda, got cuda:1"):
        EvaluateConfig.from_dict({"decode_workers": 4, "device": "cuda:1"}, "evaluate")
    with pytest.raises(ConfigError, match="evaluate.decode_workers"):
        EvaluateConfig.from_dict({"decode_workers": 0}, "evaluate")
    EvaluateConfig.from_dict({"decode_workers": 1, "device": "mps"}, "evaluate")  # one device, no sharding
    with pytest.raises(ConfigError, match="evaluate.score_device"):  # the judges' backends take no mps
        EvaluateConfig.from_dict({"score_device": "mps"}, "evaluate")


def test_a_dead_actor_loses_nothing_and_a_failed_task_or_another_checkpoint_is_named(tiny_checkpoint, tmp_path,
                                                                                   one_thread):
    """A 16-GPU evaluation runs for hours. An actor whose process or node dies has its task run again by
    another (batches are seeded by index: the same output); only when none is left does the map stop,
    saying so. A task that raises stops the map with one line naming the decoder, the utterances and the
    cause. An actor loading a checkpoint that is not the file the driver hashed (a stale copy on its
    node, a file rewritten meanwhile) is refused, not left to decode with other weights."""
    import shutil

    import ray
    from test_faults import ensure_ray

    from ray_jobs.decode_pool import DecodeFailed, DecodePool

    ensure_ray()
    path, model = tiny_checkpoint
    model.eval()
    texts, prompts = _tts_inputs()
    items = {"texts": texts, "prompts": prompts, "max_frames": GUARDS}
    local = tts_continue(model, texts, prompts, max_frames=GUARDS, batch_size=BATCH, **TTS_OPTIONS)
    copy = tmp_path / "copy.pt"
    shutil.copyfile(path, copy)
    with DecodePool(2, "cpu") as pool:
        # one task: one actor loads the copy, which is then rewritten (the same weights, other bytes)
        pool.map("tts_continue", str(copy), {k: v[:1] for k, v in items.items()}, TTS_OPTIONS, batch_size=BATCH)
        same, kwargs = tiny_meld(reduction=REDUCTION, encoder_dropout=0.5)
        save_checkpoint(copy, system="meld", model=same, model_kwargs=kwargs, extra={"task": "joint", "rewritten": 1})
        with pytest.raises(DecodeFailed, match=r"^tts_continue of .*copy\.pt, utterances \d+\.\.\d+ of 7, on decoding "
                                               r"actor \d: CheckpointError: .*copy\.pt: another file on node \S+ "
                                               r"\(SHA-256 \w{12}\) than the driver read \(\w{12}\)") as failed:
            pool.map("tts_continue", str(copy), items, TTS_OPTIONS, batch_size=BATCH)
        assert "\n" not in str(failed.value) and isinstance(failed.value.__cause__, ray.exceptions.RayTaskError)
        with pytest.raises(DecodeFailed, match=r"^tts_continue of .*, utterances \d\.\.\d of 7, on decoding actor \d: \w+: "):
            pool.map("tts_continue", str(path), items | {"texts": [[10**6]] * 7}, TTS_OPTIONS, batch_size=BATCH)

        ray.kill(pool.actors[0], no_restart=True)
        done_before = list(pool.tasks_run)
        _same_continuations(pool.map("tts_continue", str(path), items, TTS_OPTIONS, batch_size=BATCH), local)
        assert pool.dead == {0} and pool.tasks_run[0] == done_before[0]
        assert pool.tasks_run[1] - done_before[1] == 4  # every task, the dead actor's included, on the one left
        ray.kill(pool.actors[1], no_restart=True)
        with pytest.raises(DecodeFailed, match=r"every one of the 2 decoding actors has died; utterances 0\.\. of 7"):
            pool.map("tts_continue", str(path), items, TTS_OPTIONS, batch_size=BATCH)


# Run in a Ray of its own (the session's cluster has 2 CPUs, and each actor takes one): a pool of 3
# whose actors 1 and 2 (the first handed work) die while idle; then, its last actor stopped (SIGSTOP,
# as a node cut off), a map that finds no live actor. Prints one JSON line.
IDLE_DEATHS = r"""
import json, logging, os, pickle, signal, sys, time

import ray

from ray_jobs.decode_pool import DecodePool

work = sys.argv[1]
with open(os.path.join(work, "items.pkl"), "rb") as f:
    path, items, options, batch = pickle.load(f)
warnings = []


class Collect(logging.Handler):
    def emit(self, record):
        warnings.append(record.getMessage())


logging.getLogger("meld.decode_pool").addHandler(Collect())
# not ray_jobs.cluster.init_ray: it starts the dashboard too, seconds more on 2 cores, for nothing here
ray.init(address="local", num_cpus=3, include_dashboard=False, _node_ip_address="127.0.0.1",
         configure_logging=False)
out, pid = {}, None
try:
    with DecodePool(3, "cpu") as pool:
        live = pool.actors[0]
        start = time.perf_counter()  # what the pool's ping before each task costs: a round trip
        for _ in range(50):
            ray.get(live.ready.remote())
        out["ping_ms"] = (time.perf_counter() - start) / 50 * 1000
        for actor in (pool.actors[1], pool.actors[2]):
            ray.kill(actor, no_restart=True)
            deadline = time.monotonic() + 60  # the kill takes effect a moment later: wait until it has
            while time.monotonic() < deadline:
                try:
                    ray.get(actor.ready.remote(), timeout=10)
                except ray.exceptions.RayActorError:
                    break
                time.sleep(0.05)
        one = {k: v[:1] for k, v in items.items()}
        outputs = {}
        try:
            outputs["one"] = pool.map("tts_continue", path, one, options, batch_size=batch)
            out["after_one"] = {"dead": sorted(pool.dead), "tasks_run": list(pool.tasks_run)}
            outputs["all"] = pool.map("tts_continue", path, items, options, batch_size=batch)
            out["after_all"] = {"dead": sorted(pool.dead), "tasks_run": list(pool.tasks_run)}
            pid = ray.get(live.__ray_call__.remote(lambda self: os.getpid()))
            os.kill(pid, signal.SIGSTOP)
            pool.ping_timeout_s = 1.0
            start = time.perf_counter()
            try:
                pool.map("tts_continue", path, one, options, batch_size=batch)
            except Exception as err:
                out["stopped_error"] = f"{type(err).__name__}: {err}"
            out["stopped_seconds"] = time.perf_counter() - start
            out["after_stopped"] = {"dead": sorted(pool.dead)}
        except Exception as err:
            out["error"] = f"{type(err).__name__}: {err}"
        with open(os.path.join(work, "outputs.pkl"), "wb") as f:
            pickle.dump(outputs, f)
finally:
    if pid is not None:
        try:
            os.kill(pid, signal.SIGCONT)  # ray.kill asked it to exit: let it
        except ProcessLookupError:
            pass
    ray.shutdown()
out["warnings"] = warnings
print(json.dumps(out))
"""


def test_actors_that_died_while_idle_cost_no_task_a_retry(tiny_checkpoint, tmp_path, one_thread):
    """Two of three actors die between maps (a node with two actors lost overnight). The pool must
    find them dead before handing them work, not hand the task to one, count its death against the
    task, hand it to the other and stop with "the second actor to die running these utterances"
    while a live actor waits. An actor that does not answer at all (its node cut off) is killed and
    counted dead the same way; with none left the map says so."""
    import json
    import os
    import pickle
    import subprocess
    import sys
    from pathlib import Path

    path, model = tiny_checkpoint
    model.eval()
    texts, prompts = _tts_inputs()
    items = {"texts": texts, "prompts": prompts, "max_frames": GUARDS}
    with open(tmp_path / "items.pkl", "wb") as f:
        pickle.dump((str(path), items, TTS_OPTIONS, BATCH), f)
    local_one = tts_continue(model, texts[:1], prompts[:1], max_frames=GUARDS[:1], batch_size=BATCH, **TTS_OPTIONS)
    local_all = tts_continue(model, texts, prompts, max_frames=GUARDS, batch_size=BATCH, **TTS_OPTIONS)
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # not the session's cluster
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    run = subprocess.run([sys.executable, "-c", IDLE_DEATHS, str(tmp_path)], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    out = json.loads(lines[-1])
    assert "error" not in out, out["error"]
    with open(tmp_path / "outputs.pkl", "rb") as f:
        outputs = pickle.load(f)
    _same_continuations(outputs["one"], local_one)
    _same_continuations(outputs["all"], local_all)
    # the one task and then all four ran on actor 0, none lost on the dead actors
    assert out["after_one"] == {"dead": [1, 2], "tasks_run": [1, 0, 0]}
    assert out["after_all"] == {"dead": [1, 2], "tasks_run": [5, 0, 0]}
    idle = [w for w in out["warnings"] if "died while idle" in w]
    assert sorted(w.split()[2] for w in idle) == ["1", "2"], out["warnings"]
    assert all("no task lost, " in w for w in idle)
    assert not any("runs again" in w for w in out["warnings"]), out["warnings"]
    # the stopped actor: killed after the 1 s ping timeout, and the map stops saying none is left
    assert out["after_stopped"] == {"dead": [0, 1, 2]}
    assert out["stopped_error"].startswith("DecodeFailed: tts_continue of ")
    assert "every one of the 3 decoding actors has died; utterances 0.. of 1 not decoded" in out["stopped_error"]
    assert any(w.startswith("decoding actor 0 did not answer within 1 s while idle") for w in out["warnings"])
    assert 1.0 <= out["stopped_seconds"] < 30, out["stopped_seconds"]
    print(f"ping {out['ping_ms']:.2f} ms")


def test_an_actor_still_running_a_stopped_maps_task_is_not_taken_for_dead(tmp_path, one_thread):
    """A map stops when a task raises, while another actor is still decoding its task. The next map
    must not ping that actor (the answer waits behind the task, so the ping would time out and kill a
    live actor): it is handed work once that task comes back."""
    import ray
    import torch
    from test_faults import ensure_ray

    from meld.models.vocab import EOS
    from ray_jobs.decode_pool import DecodeFailed, DecodePool

    ensure_ray()
    model, kwargs = tiny_meld(reduction=REDUCTION, encoder_dropout=0.5)
    with torch.no_grad():
        model.head.bias[EOS] = -1e4  # <EOS> never sampled: a task decodes all its max_frames
    path = str(save_checkpoint(tmp_path / "model.pt", system="meld", model=model, model_kwargs=kwargs,
                               extra={"task": "joint"}))
    model.eval()
    texts, prompts = _tts_inputs()
    items = {"texts": texts, "prompts": prompts, "max_frames": GUARDS}
    local = tts_continue(model, texts, prompts, max_frames=GUARDS, batch_size=BATCH, **TTS_OPTIONS)
    # two tasks: actor 1, handed work first, gets batch 0, out of the vocabulary (it raises at once);
    # actor 0 decodes batch 1, 2000 frames (~1 s on one core), after the map has stopped
    stopping = {"texts": [[10**6]] * 2 + texts[2:4], "prompts": prompts[:4], "max_frames": [8, 8, 2000, 2000]}
    with DecodePool(2, "cpu") as pool:
        with pytest.raises(DecodeFailed, match=r"utterances 0\.\.1 of 4, on decoding actor 1: ValueError"):
            pool.map("tts_continue", path, stopping, TTS_OPTIONS, batch_size=BATCH)
        pool.ping_timeout_s = 0.2  # far below the task actor 0 is still running
        two = {k: v[:4] for k, v in items.items()}  # two tasks: both actors would be pinged
        _same_continuations(pool.map("tts_continue", path, two, TTS_OPTIONS, batch_size=BATCH), local[:4])
        assert pool.dead == set()
        ray.get(pool.actors[0].ready.remote())  # answers once actor 0's task is done
        before = pool.tasks_run[0]
        _same_continuations(pool.map("tts_continue", path, items, TTS_OPTIONS, batch_size=BATCH), local)
        assert pool.dead == set() and pool.tasks_run[0] > before  # free again, and handed work
