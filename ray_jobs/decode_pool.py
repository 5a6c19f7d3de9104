"""The evaluation's decoding, sharded over Ray actors: one per GPU (or per CPU core).

``evaluate.decode_workers`` > 1 makes ``pipeline.evaluate`` hand its TTS generations and STT beam
searches to a :class:`DecodePool` instead of running them in its own process on one device. The
list of utterances is cut at batch boundaries into tasks of whole batches; each actor loads the
checkpoint once (from its path: on a multi-node cluster it must sit on storage every node reads, as
Ray Train's checkpoints do) and takes the next task as soon as it is free, so long and short batches
even out across devices. Results come back in the list's order.

The output is the same as decoding the whole list in one process: a batch holds the same
utterances whichever actor runs it, and TTS batch k is seeded ``batch_seed(seed, k)`` by its index
in the whole list (``first_batch``), not by what the actor ran before.

So an actor that dies (its process killed, its node lost) loses nothing, and the pool goes on with the
actors left (:attr:`DecodePool.dead` names the dead; when none is left, the map stops saying so). A
task whose actor dies while running it is run again by another actor, with the same output; a second
death running the same utterances stops the map, the batches themselves being the likely cause. An
actor that died while idle (between maps or tasks) must not count as such a death: every actor is
pinged before it is handed a task (``ready()``, one round trip of about a millisecond, all those about
to get work at once), and one that is dead joins the dead with a warning and no task counted against
it. One that does not answer within ``ping_timeout_s`` (its node lost and not yet declared dead by Ray,
or unreachable) is killed (``ray.kill``) and counted dead the same way: a late answer cannot be told
from none, and a killed actor cannot come back half-way through a task. (An actor still running a task
of a map that stopped is not pinged, as its answer would wait behind that task: it is handed work once
the task comes back.) A task that raises stops the map with one line naming the decoder, the utterances
and the cause. Every actor checks that the checkpoint it loads is the file the driver hashed (SHA-256):
a node with a stale or partial copy at the same path, or a file rewritten while the pool runs, would
otherwise decode with other weights than the rest, silently. CPU actors decode on the file's own pages,
shared through the page cache (``load_model(share_file_pages=True)``): while the pool runs, the file
may be replaced (a new file renamed over it, as :func:`meld.training.save_checkpoint` writes) but not
rewritten in place.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import math
import time
from collections import deque
from pathlib import Path

log = logging.getLogger("meld.decode_pool")

# what a pool can run: name -> (module, function); each takes (model, **items, batch_size=..., **options)
DECODERS = {
    "tts_continue": ("meld.generate", "tts_continue"),
    "continue_codes": ("meld.codes", "continue_codes"),
    "stt_beam_search": ("meld.generate", "stt_beam_search"),
}
SEEDED = {"tts_continue", "continue_codes"}  # take first_batch: their batches are seeded by index
TASKS_PER_WORKER = 4  # tasks a list is cut into per actor: enough to even out uneven batches
START_TIMEOUT_S = 300.0  # how long every actor may take to be placed and started before the pool gives up
# how long an idle actor may take to answer the ping before a task: an idle actor answers in about a
# millisecond, so one silent this long is on a node lost (Ray's health checks declare it dead after 15-50 s) or cut off
PING_TIMEOUT_S = 30.0


class PoolRefused(ValueError):
    """The cluster cannot hold the pool: too few GPUs or cores in all, or not free within the start timeout."""


class DecodeFailed(RuntimeError):
    """A decoding task raised, or its actors died: one line naming the decoder, checkpoint, utterances and cause
    (the Ray error it comes from, with the remote traceback, is its ``__cause__``)."""


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (a checkpoint every actor must load the same)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _one_line(err: BaseException) -> str:
    """What a Ray error says went wrong, in one line: a failed task's own exception, or a dead actor's
    first line."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: " + " ".join(str(cause).split())
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


class _Decoder:
    """One actor: a device, the models it has loaded (by checkpoint path and compile flag), and a decode call."""

    def __init__(self, device: str, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.device = device
        self.models: dict[tuple[str, bool], object] = {}

    def ready(self) -> bool:
        """Answers once the actor is placed and constructed (the pool waits for every actor's answer)."""
        return True

    def run(self, function: str, checkpoint: str, digest: str, compile: bool, items: dict[str, list], options: dict
            ) -> tuple[list, float, float]:
        """The decoded items, the seconds the decoding took here (model loading left out) and the
        part of them the compiled step spent compiling (``decoding_compile_seconds``)."""
        from meld.models.backbone import decoding_compile_seconds

        module, name = DECODERS[function]
        decode = getattr(importlib.import_module(module), name)
        model = self._model(checkpoint, compile, digest)
        compiled_before = decoding_compile_seconds(model)
        start = time.perf_counter()
        out = decode(model, **items, **options)
        return out, time.perf_counter() - start, decoding_compile_seconds(model) - compiled_before

    def _model(self, checkpoint: str, compile: bool, digest: str | None = None):
        """The model of ``checkpoint``, loaded once; ``digest``: the SHA-256 the driver read, which the
        file here must have when it loads."""
        key = (checkpoint, compile)
        if key not in self.models:
            from meld.models.backbone import configure_decoding
            from meld.training import CheckpointError, load_model, weight_sharing_copy

            other = self.models.get((checkpoint, not compile))
            if other is not None:  # a joint model's TTS (compiled) and STT sides: one set of weights
                model = weight_sharing_copy(other)
            else:
                if digest is not None:
                    import ray

                    where = f"on node {ray.util.get_node_ip_address()}"
                    try:
                        here = file_sha256(checkpoint)
                    except OSError as err:
                        raise CheckpointError(f"{checkpoint}: not readable {where} ({err.strerror}), where the "
                                              "evaluation's driver reads it: on several nodes it must lie on storage "
                                              "every node mounts at the same path") from None
                    if here != digest:
                        raise CheckpointError(f"{checkpoint}: another file {where} (SHA-256 {here[:12]}) than the "
                                              f"driver read ({digest[:12]}): a stale copy on this node, or rewritten "
                                              "while the evaluation runs; every decoding actor must load the same "
                                              "weights")
                # a CPU actor's weights are the file's pages, shared with the node's other actors through
                # the page cache (one copy on the node, not one per actor); an exported model.pt is stored in
                # the decoding layout, so decoding copies none of them (a training checkpoint's Linear weights
                # are re-laid into private memory: see load_model); a GPU actor copies them
                model, _ = load_model(checkpoint, share_file_pages=self.device == "cpu")
                model.to(self.device)
            if compile:
                configure_decoding(model, compile=True)
            self.models[key] = model
        return self.models[key]


class DecodePool:
    """``workers`` decoding actors on ``device`` (``cpu``: one core each; ``cuda``: one GPU each; ``auto``:
    GPUs when the Ray cluster has them).

    Joins the Ray cluster in RAY_ADDRESS (under ``ray job submit``) or starts a local one. Refuses
    (:class:`PoolRefused`), with the numbers, a pool the cluster has too few GPUs or CPUs for in all,
    at once, and one whose actors are not all placed within ``start_timeout_s`` (other jobs hold the
    devices): Ray would otherwise keep a task for an actor that never starts and wait forever. Use
    as a context manager; leaving it kills the actors, and shuts down a local Ray it started.
    ``ping_timeout_s``: how long an idle actor may take to answer the ping sent before it is handed a
    task; one silent longer is killed and counted dead (the module's docstring says why).
    """

    def __init__(self, workers: int, device: str, start_timeout_s: float = START_TIMEOUT_S,
                 ping_timeout_s: float = PING_TIMEOUT_S):
        import ray

        from ray_jobs.cluster import init_ray

        if workers < 1:
            raise ValueError(f"decode_workers must be >= 1, got {workers}")
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"decoding sharded over {workers} workers needs device auto, cpu or cuda (one GPU "
                             f"per worker, chosen by Ray), not {device}")
        self._started_ray = not ray.is_initialized()
        init_ray()
        # auto: GPUs when the cluster has any (the driver's own node may have none)
        kind = device if device != "auto" else ("cuda" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu")
        resource = "GPU" if kind == "cuda" else "CPU"
        have = int(ray.cluster_resources().get(resource, 0))
        if have < workers:
            self.close()
            raise PoolRefused(f"decode_workers={workers} needs {workers} {resource}s, one per worker; the Ray "
                              f"cluster has {have}: lower evaluate.decode_workers")
        options = {"num_gpus": 1, "num_cpus": 1} if kind == "cuda" else {"num_cpus": 1}
        actor = ray.remote(**options)(_Decoder)
        # inside a GPU actor Ray narrows CUDA_VISIBLE_DEVICES to its own GPU: "cuda" is that one
        self.actors = [actor.remote(kind, 1) for _ in range(workers)]
        started, _ = ray.wait([a.ready.remote() for a in self.actors], num_returns=workers, timeout=start_timeout_s)
        if len(started) < workers:
            free = ray.available_resources().get(resource, 0)
            self.close()
            raise PoolRefused(f"decode_workers={workers}: only {len(started)} of {workers} actors started within "
                              f"{start_timeout_s:g} s; the cluster has {have} {resource}s, {free:g} free now (other "
                              "jobs hold the rest): lower evaluate.decode_workers or free them")
        self.workers = workers
        self.ping_timeout_s = ping_timeout_s
        self.dead: set[int] = set()  # actors whose process or node died (their tasks ran again on others)
        # actor -> its task of a map that stopped (a task raised) before it came back: the actor is busy
        # until it does, and a ping would wait behind it
        self._unfinished: dict[int, object] = {}
        self._digests: dict[str, str] = {}  # checkpoint -> SHA-256 when the pool first used it
        self.tasks_run = [0] * workers  # tasks each actor has run (bench.decode_pool shows them; tests check them)
        self.device_seconds = 0.0  # decoding time summed over the actors, of the last map()
        self.compile_seconds = 0.0  # the part of it the actors' compiled steps spent compiling
        log.info("decoding sharded over %d Ray actors (%s)", workers, "one GPU each" if kind == "cuda" else "one core each")

    def map(self, function: str, checkpoint: str, items: dict[str, list], options: dict, *, batch_size: int,
            compile: bool = False, progress_desc: str | None = None) -> list:
        """``function(model, **items, batch_size=batch_size, **options)`` over the whole lists, sharded.
        Afterwards :attr:`device_seconds` holds the decoding time summed over the actors (what one
        device would have spent, for a real-time factor that does not shrink with the pool), and
        :attr:`compile_seconds` the part of it spent compiling (0.0 without ``compile``).

        Args:
            function: a key of :data:`DECODERS`.
            checkpoint: the model's checkpoint path, as every actor can read it.
            items: the function's per-utterance arguments (texts, prompts, max_frames, ...): equally long
                lists, cut at batch boundaries.
            options: its other keyword arguments, the same for every task (no ``progress_desc``: the
                pool shows the bar).
            compile: decode through the compiled step (``configure_decoding(compile=True)``).
        """
        import ray

        from meld.progress import progress

        if function not in DECODERS:
            raise ValueError(f"unknown decoder {function!r}; one of {sorted(DECODERS)}")
        n = len(next(iter(items.values())))
        if any(len(v) != n for v in items.values()):
            raise ValueError(f"{function}: per-utterance lists of different lengths "
                             f"{ {k: len(v) for k, v in items.items()} }")
        checkpoint = str(Path(checkpoint).resolve())  # an actor's working directory need not be this one
        # hashed once per pool: an actor loading it later (a new split, a new variant) must load these bytes
        if checkpoint not in self._digests:
            self._digests[checkpoint] = file_sha256(checkpoint)
        digest = self._digests[checkpoint]
        batches = math.ceil(n / batch_size)
        per_task = max(1, math.ceil(batches / (TASKS_PER_WORKER * self.workers)))  # batches per task
        queue = deque(range(0, batches, per_task))  # each task's first batch
        results: dict[int, list] = {}
        self.device_seconds = self.compile_seconds = 0.0
        # an earlier map's unfinished tasks (first batch None): their actors are free again when they
        # come back (not pinged before: the ping would wait behind the task, and time out)
        pending: dict = {ref: (None, actor, 0, 0) for actor, ref in self._unfinished.items()}
        idle = [a for a in range(len(self.actors)) if a not in self.dead and a not in self._unfinished]
        lost: set[int] = set()  # tasks (by first batch) whose actor died once already
        bar = progress(total=n, desc=progress_desc, unit="utt", disable=progress_desc is None)
        try:
            # until this map's tasks are done (an earlier map's still running stay in _unfinished)
            while queue or any(first is not None for first, *_ in pending.values()):
                if queue and idle:  # those about to get work: the last of idle, as popped below
                    self._drop_dead_idle(idle, min(len(queue), len(idle)))
                if not idle and not pending:
                    raise DecodeFailed(f"{function} of {checkpoint}: every one of the {len(self.actors)} decoding "
                                       f"actors has died; utterances {queue[0] * batch_size}.. of {n} not decoded")
                while queue and idle:
                    first = queue.popleft()
                    lo, hi = first * batch_size, min(n, (first + per_task) * batch_size)
                    call = dict(options, batch_size=batch_size, **({"first_batch": first} if function in SEEDED else {}))
                    actor = idle.pop()
                    ref = self.actors[actor].run.remote(function, checkpoint, digest, compile,
                                                        {k: v[lo:hi] for k, v in items.items()}, call)
                    pending[ref] = (first, actor, lo, hi)
                (done,), _ = ray.wait(list(pending), num_returns=1)
                first, actor, lo, hi = pending.pop(done)
                if first is None:  # an earlier map's task: whatever it says was reported or is not wanted
                    try:
                        ray.get(done)
                    except ray.exceptions.RayActorError as err:
                        self._drop(actor, f"died finishing a task of an earlier map that stopped ({_one_line(err)})")
                        continue
                    except ray.exceptions.RayError:
                        pass
                    idle.append(actor)
                    continue
                what = f"{function} of {checkpoint}, utterances {lo}..{hi - 1} of {n}, on decoding actor {actor}"
                try:
                    results[first], seconds, compiling = ray.get(done)
                except ray.exceptions.RayActorError as err:
                    # its process or node died: the task runs again on another actor (its batches are seeded
                    # by index: the same output); twice lost, the batches themselves are the likely cause.
                    # Killed too: one only unreachable for a while (ActorUnavailableError) would otherwise
                    # go on holding its GPU or core, and could come back half-way through another task
                    ray.kill(self.actors[actor], no_restart=True)
                    self.dead.add(actor)
                    if first in lost:
                        raise DecodeFailed(f"{what}: the second actor to die running these utterances "
                                           f"({_one_line(err)})") from err
                    lost.add(first)
                    queue.appendleft(first)
                    log.warning("%s: the actor died (%s); %d of %d actors left, the task runs again", what,
                                _one_line(err), len(self.actors) - len(self.dead), len(self.actors))
                    continue
                except ray.exceptions.RayError as err:  # the decoding itself raised: the remote traceback is chained
                    raise DecodeFailed(f"{what}: {_one_line(err)}") from err
                self.device_seconds += seconds
                self.compile_seconds += compiling
                self.tasks_run[actor] += 1
                idle.append(actor)
                bar.update(hi - lo)
        finally:
            bar.close()
            self._unfinished = {actor: ref for ref, (_, actor, _, _) in pending.items()}
        return [item for first in sorted(results) for item in results[first]]

    def _drop_dead_idle(self, idle: list[int], wanted: int) -> None:
        """Pings the last ``wanted`` actors of ``idle`` (the next to be handed tasks), all at once, and
        removes those dead or silent for :attr:`ping_timeout_s` (:meth:`_drop`); then the next ones, until
        ``wanted`` have answered or none is left. The others keep their order."""
        import ray

        alive: set[int] = set()
        while ask := [a for a in idle[-wanted:] if a not in alive]:
            refs = {self.actors[a].ready.remote(): a for a in ask}
            answered, _ = ray.wait(list(refs), num_returns=len(refs), timeout=self.ping_timeout_s)
            answered = set(answered)
            for ref, actor in refs.items():
                if ref not in answered:
                    self._drop(actor, f"did not answer within {self.ping_timeout_s:g} s while idle (its node lost "
                                      "or unreachable): killed")
                    idle.remove(actor)
                    continue
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError as err:
                    self._drop(actor, f"died while idle ({_one_line(err)})")
                    idle.remove(actor)
                    continue
                alive.add(actor)

    def _drop(self, actor: int, why: str) -> None:
        """Counts an actor found dead while it ran no task of this map as dead (no task lost); kills it,
        so that one merely cut off cannot come back."""
        import ray

        ray.kill(self.actors[actor], no_restart=True)
        self.dead.add(actor)
        log.warning("decoding actor %d %s; no task lost, %d of %d actors left", actor, why,
                    len(self.actors) - len(self.dead), len(self.actors))

    def close(self) -> None:
        import ray

        for actor in getattr(self, "actors", []):
            ray.kill(actor)
        self.actors = []
        if self._started_ray and ray.is_initialized():
            ray.shutdown()

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
