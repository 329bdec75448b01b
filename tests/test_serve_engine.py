"""The engine behind `gill serve` (serving/engine.py): dynamic batching answers exactly as one job at a time, the
prefix cache answers as recomputing, and every waiter is woken on every path (cancellation, a failing job, a full
queue, timeouts, shutdown). Every await is bounded by `asyncio.wait_for`: a hang fails the test instead of the suite."""

import asyncio
import math
import threading

import numpy as np
import pytest
import torch

from gill_pipeline.serving.batching import options_key, plan_groups
from gill_pipeline.serving.engine import GILLEngine
from gill_pipeline.serving.jobs import (
    ChatJob,
    EngineClosed,
    Finished,
    ImageReady,
    JobCancelled,
    QueueFull,
    TextDelta,
)
from gill_pipeline.serving.prefix_cache import PrefixCache, conversation_keys, past_nbytes

from conftest import make_pipeline, random_image


WAIT = 60  # seconds any await may take before the test fails as a hang
# Every answer has text then one forced image (2 denoising steps), sampled with the job's own seed.
IMAGE_OPTIONS = dict(
    max_new_tokens=6, min_text_tokens=2, img_logit_scale=math.inf, max_images=1, num_inference_steps=2,
    do_sample=True, temperature=0.8,
)
TEXT_OPTIONS = dict(max_new_tokens=8, do_sample=True, max_images=0)


@pytest.fixture(scope="module")
def pipe():
    return make_pipeline()


def user(text, image=None):
    content = [{"type": "text", "text": text}]
    if image is not None:
        content.append({"type": "image", "image": image})
    return {"role": "user", "content": content}


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, WAIT))


def answer_arrays(result):
    """The answer's parts comparable across calls: texts as they are, images as int arrays."""
    return [
        part["text"] if part["type"] == "text" else np.asarray(part["image"], dtype=np.int16)
        for part in result.message["content"]
    ]


def assert_same_answer(a, b):
    pa, pb = answer_arrays(a), answer_arrays(b)
    assert [type(p) for p in pa] == [type(p) for p in pb]
    for x, y in zip(pa, pb):
        if isinstance(x, str):
            assert x == y
        else:
            # Images are PNG-ready uint8: 1e-5 in [0, 1] before rounding is at most one level after it.
            assert x.shape == y.shape and np.abs(x - y).max() <= 1
    assert (a.completion_tokens, a.prompt_tokens, a.finish_reason) == (b.completion_tokens, b.prompt_tokens, b.finish_reason)


def jobs_for(options, n=4):
    """`n` jobs of different lengths (the batch is left-padded) with their own seeds; one has an input image."""
    return [
        ChatJob([user("a dog " * (i + 1), random_image(i) if i == 1 else None)], dict(options), seed=10 + i)
        for i in range(n)
    ]


async def answer_all(pipe, jobs, **engine_kwargs):
    engine = GILLEngine(pipe, **engine_kwargs)
    await engine.start()
    try:
        results = await asyncio.gather(*[engine.submit(job) for job in jobs])
        return results, engine.stats()
    finally:
        await engine.shutdown(grace_s=5)


class Gate:
    """A denoising-step callback that holds the worker until released: a job in flight for as long as a test needs."""

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, pipe, step, timestep, callback_kwargs):
        self.entered.set()
        self.release.wait(WAIT)
        return callback_kwargs

    async def wait_entered(self):
        assert await asyncio.to_thread(self.entered.wait, WAIT)


def gated_job(gate, seed=0):
    return ChatJob([user("hold the worker")], dict(IMAGE_OPTIONS, callback_on_step_end=gate), seed=seed)


@pytest.mark.parametrize("options", [IMAGE_OPTIONS, TEXT_OPTIONS], ids=["with-image", "text-only"])
def test_batched_answers_equal_one_at_a_time(pipe, options):
    batched, stats = run(answer_all(pipe, jobs_for(options), max_batch_size=4, batch_wait_ms=500, prefix_cache_bytes=0))
    alone, alone_stats = run(answer_all(pipe, jobs_for(options), max_batch_size=1, prefix_cache_bytes=0))
    assert stats["batches_run"] == 1 and stats["mean_batch_size"] == 4.0
    assert alone_stats["batches_run"] == 4
    for a, b in zip(batched, alone):
        assert_same_answer(a, b)
    if options is IMAGE_OPTIONS:
        assert all(any(p["type"] == "image" for p in r.message["content"]) for r in batched)
    # The answer alone in the engine is `pipe(messages, generator=[seeded])`.
    job = jobs_for(options)[2]
    direct = pipe(job.messages, generator=[torch.Generator().manual_seed(job.seed)], **options)
    assert [p.get("text") for p in direct.messages[0]["content"]] == [p.get("text") for p in alone[2].message["content"]]


def test_batched_streams_equal_one_at_a_time(pipe):
    async def streams(**engine_kwargs):
        engine = GILLEngine(pipe, prefix_cache_bytes=0, **engine_kwargs)
        try:
            async def collect(job):
                return [event async for event in engine.stream(job)]

            jobs = jobs_for(IMAGE_OPTIONS, 3)
            return await asyncio.gather(*[collect(job) for job in jobs]), engine.stats()
        finally:
            await engine.shutdown(grace_s=5)

    batched, stats = run(streams(max_batch_size=3, batch_wait_ms=500))
    alone, _ = run(streams(max_batch_size=1))
    assert stats["batches_run"] == 1
    for a, b in zip(batched, alone):
        assert isinstance(a[-1], Finished) and isinstance(b[-1], Finished)
        assert_same_answer(a[-1].result, b[-1].result)
        text = lambda events: "".join(e.text for e in events if isinstance(e, TextDelta))  # noqa: E731
        assert text(a) == text(b) and len(text(a)) > 0
        assert sum(isinstance(e, ImageReady) for e in a) == sum(isinstance(e, ImageReady) for e in b) == 1


def test_a_stream_cancelled_mid_batch_leaves_the_others_exact(pipe):
    """Three streamed jobs in one call; the second one's client goes away while the batch denoises: it gets
    `JobCancelled`, the other two their answers, equal to one at a time."""

    def jobs(gate):
        return [ChatJob(j.messages, dict(IMAGE_OPTIONS, callback_on_step_end=gate), seed=j.seed)
                for j in jobs_for(IMAGE_OPTIONS, 3)]

    async def scenario():
        gate = Gate()
        engine = GILLEngine(pipe, max_batch_size=3, batch_wait_ms=500, prefix_cache_bytes=0)
        try:
            gated = jobs(gate)
            streams = [engine.stream(job) for job in gated]
            collect = lambda s: asyncio.ensure_future(_collect(s))  # noqa: E731
            tasks = [collect(s) for s in streams]
            await gate.wait_entered()  # text decoded, denoising under way
            gated[1].cancelled.set()
            gate.release.set()
            return await asyncio.gather(*tasks, return_exceptions=True), engine.stats()
        finally:
            gate.release.set()
            await engine.shutdown(grace_s=5)

    async def _collect(stream):
        return [event async for event in stream]

    released = Gate()
    released.release.set()
    (first, cancelled, third), stats = run(scenario())
    reference, _ = run(answer_all(pipe, jobs(released), max_batch_size=1, prefix_cache_bytes=0))
    assert isinstance(cancelled, JobCancelled), cancelled
    assert stats["batches_run"] == 1 and stats["jobs_cancelled"] == 1
    assert_same_answer(first[-1].result, reference[0])
    assert_same_answer(third[-1].result, reference[2])


def test_a_row_cancelled_while_its_batch_decodes_stops_and_gets_no_image(pipe, monkeypatch):
    """Three jobs in one call; the second one is cancelled as its row decodes its first word: that row stops at its
    next choice and no image is made for it (the batch generates two images, not three); the other two answer as
    one at a time."""
    from gill_pipeline.pipeline.decoding import GILLDecoder

    jobs = jobs_for(IMAGE_OPTIONS, 3)
    decoded, generated = [], []
    original_call = GILLDecoder.__call__

    def decoder_call(self, prompt_embeds, settings, generator=None, **kwargs):
        inner = kwargs.get("on_token")

        def on_token(row, token):
            if len(prompt_embeds) == 3 and row == 1:
                jobs[1].cancelled.set()  # the client goes away as its row decodes
            if inner is not None:
                inner(row, token)

        rows = original_call(self, prompt_embeds, settings, generator, **{**kwargs, "on_token": on_token})
        decoded.append(rows)
        return rows

    original_generate = pipe.generate_for_groups

    def generate_for_groups(img_hidden, requests, to_generate, *args, **kwargs):
        generated.append(len(to_generate))
        return original_generate(img_hidden, requests, to_generate, *args, **kwargs)

    monkeypatch.setattr(GILLDecoder, "__call__", decoder_call)
    monkeypatch.setattr(pipe, "generate_for_groups", generate_for_groups)

    async def scenario():
        engine = GILLEngine(pipe, max_batch_size=3, batch_wait_ms=500, prefix_cache_bytes=0)
        try:
            results = await asyncio.gather(*[engine.submit(job) for job in jobs], return_exceptions=True)
            return results, engine.stats()
        finally:
            await engine.shutdown(grace_s=5)

    (first, cancelled, third), stats = run(scenario())
    assert isinstance(cancelled, JobCancelled), cancelled
    assert stats["batches_run"] == 1 and stats["jobs_cancelled"] == 1 and stats["jobs_completed"] == 2
    (rows,) = decoded
    assert rows[1].num_text_tokens == 1 and len(rows[1].token_ids) == 1 and rows[1].img_starts == []
    assert all(len(rows[b].img_starts) == 1 for b in (0, 2))
    assert generated == [2]  # the cancelled row's image is never made
    monkeypatch.undo()
    reference, _ = run(answer_all(pipe, jobs_for(IMAGE_OPTIONS, 3), max_batch_size=1, prefix_cache_bytes=0))
    assert_same_answer(first, reference[0])
    assert_same_answer(third, reference[2])


def test_decoder_stops_one_row_and_leaves_the_others_exact(pipe, monkeypatch):
    """`should_stop(row)` at the decoder: the stopped row ends at its next choice with its [IMG] group dropped; the
    other rows decode exactly as with no row stopped (same tokens, same hidden states)."""
    from gill_pipeline.pipeline.decoding import GILLDecoder

    jobs = jobs_for(IMAGE_OPTIONS, 3)
    generators = lambda: [torch.Generator().manual_seed(job.seed) for job in jobs]  # noqa: E731
    seen = {}
    original_call = GILLDecoder.__call__

    def decoder_call(self, prompt_embeds, settings, generator=None, **kwargs):
        seen.update(embeds=prompt_embeds, settings=settings)
        return original_call(self, prompt_embeds, settings, generator, **kwargs)

    monkeypatch.setattr(GILLDecoder, "__call__", decoder_call)
    pipe([job.messages for job in jobs], generator=generators(), output_type="pt", **IMAGE_OPTIONS)
    monkeypatch.undo()
    embeds, settings = seen["embeds"], seen["settings"]
    full = pipe.decode(embeds, settings, generators())
    chosen = {0: 0, 1: 0, 2: 0}

    def should_stop(row):
        chosen[row] += 1
        return row == 1 and chosen[row] > 4  # row 1 stops after its text and its [IMG] group

    stopped = pipe.decode(embeds, settings, generators(), should_stop=should_stop)
    assert len(full[1].img_starts) == 1 and stopped[1].img_starts == []
    assert stopped[1].token_ids == full[1].token_ids[: full[1].img_starts[0]]
    assert len(stopped[1].hidden_states) == len(stopped[1].token_ids)
    for b in (0, 2):
        assert stopped[b].token_ids == full[b].token_ids and stopped[b].img_starts == full[b].img_starts
        torch.testing.assert_close(torch.stack(stopped[b].hidden_states), torch.stack(full[b].hidden_states))


def test_batched_images_within_1e5_of_alone_before_rounding(pipe):
    """What the engine's batched call does (one call, a generator per job) gives images within 1e-5 of the jobs'
    calls alone, before they are rounded to 8 bits."""
    jobs = jobs_for(IMAGE_OPTIONS, 3)
    generators = lambda: [torch.Generator().manual_seed(job.seed) for job in jobs]  # noqa: E731
    batched = pipe([job.messages for job in jobs], generator=generators(), output_type="pt", **IMAGE_OPTIONS)
    for b, (job, generator) in enumerate(zip(jobs, generators())):
        alone = pipe(job.messages, generator=[generator], output_type="pt", **IMAGE_OPTIONS)
        assert batched.texts[b] == alone.texts[0]
        torch.testing.assert_close(batched.images[b], alone.images[0], atol=1e-5, rtol=0)


def test_jobs_with_different_options_are_not_batched_together():
    a = ChatJob([user("x")], dict(max_new_tokens=4, do_sample=False))
    b = ChatJob([user("y")], dict(do_sample=False, max_new_tokens=4))  # the same options in another order
    c = ChatJob([user("z")], dict(max_new_tokens=5))
    d = ChatJob([user("w")], dict(max_new_tokens=4, do_sample=False), stream=True)
    assert options_key(a.options) == options_key(b.options) != options_key(c.options)
    items = [type("Item", (), {"job": job})() for job in (a, b, c, d, a)]
    groups = plan_groups(items, max_batch_size=2, runs_alone=lambda item: item.job.stream)
    assert [[items.index(i) for i in g.items] for g in groups] == [[0, 1], [2], [3], [4]]
    assert [g.alone for g in groups] == [False, False, True, False]


def test_prefix_cache_hit_answers_as_recompute(pipe):
    first = [user("a red circle", random_image(3)), ]

    async def dialogue(cache_bytes):
        engine = GILLEngine(pipe, max_batch_size=1, prefix_cache_bytes=cache_bytes)
        try:
            one = await engine.submit(ChatJob(first, dict(IMAGE_OPTIONS), seed=1))
            # The client resends the whole history, the answer's image part included.
            second = first + [one.message, user("now in blue")]
            two = await engine.submit(ChatJob(second, dict(IMAGE_OPTIONS), seed=2))
            return one, two, engine.stats()
        finally:
            await engine.shutdown(grace_s=5)

    one, two, stats = run(dialogue(64 << 20))
    one_ref, two_ref, ref_stats = run(dialogue(0))
    assert stats["cache_hits"] == 1 and stats["cache_entries"] >= 1 and stats["cache_bytes"] > 0
    assert ref_stats["cache_hits"] == 0 and ref_stats["cache_bytes"] == 0
    assert_same_answer(one, one_ref)
    assert_same_answer(two, two_ref)


def test_prefix_cache_evicts_least_recent_by_bytes(pipe):
    pasts = []
    for text in ("one", "two two", "three three three"):
        out = pipe([user(text)], max_new_tokens=2)
        pasts.append(out.past)
    sizes = [past_nbytes(p) for p in pasts]
    assert all(s > 0 for s in sizes)
    assert sizes[0] < sizes[1] < sizes[2] < sizes[0] + sizes[1] + sizes[2]
    cache = PrefixCache(max_bytes=sizes[0] + sizes[2] + 1)
    cache.insert(pasts[0])
    cache.insert(pasts[1])
    assert len(cache) == 2 and cache.bytes == sizes[0] + sizes[1]
    # A lookup makes the first one the most recently used: the second is dropped for the third.
    assert cache.lookup(conversation_keys(pipe, [user("one")])) is not None
    cache.insert(pasts[2])
    assert cache.bytes == sizes[0] + sizes[2] and cache.evictions == 1 and len(cache) == 2
    kept = {tuple(e.past.keys) for e in cache._entries.values()}
    assert kept == {tuple(pasts[0].keys), tuple(pasts[2].keys)}
    # A past larger than the whole cap is not kept; a hit hands out a copy (the entry is not spent by the call).
    small = PrefixCache(max_bytes=1)
    small.insert(pasts[0])
    assert len(small) == 0
    with pytest.raises(ValueError, match="prefix_cache_bytes"):
        PrefixCache(max_bytes=-1)


def test_cancelled_job_is_dropped_before_it_runs(pipe):
    async def scenario():
        gate = Gate()
        engine = GILLEngine(pipe, max_batch_size=1)
        try:
            blocker = asyncio.ensure_future(engine.submit(gated_job(gate)))
            await gate.wait_entered()
            job = ChatJob([user("never runs")], dict(TEXT_OPTIONS))
            waiting = asyncio.ensure_future(engine.submit(job))
            await asyncio.sleep(0.05)
            job.cancelled.set()
            gate.release.set()
            await blocker
            with pytest.raises(JobCancelled):
                await waiting
            return engine.stats()
        finally:
            gate.release.set()
            await engine.shutdown(grace_s=5)

    stats = run(scenario())
    assert stats["jobs_cancelled"] == 1 and stats["batches_run"] == 1  # only the blocker ran


def test_stream_events_and_cancel_mid_stream(pipe):
    forwards, cancel_at = [], {}

    def count_and_cancel(*args):
        forwards.append(1)
        # The client goes away after the 5th LM pass of the streamed job (set from the worker's own thread, so the
        # point is exact however busy the machine is).
        if len(forwards) == 5 and "job" in cancel_at:
            cancel_at["job"].cancelled.set()

    hook = pipe.llm.register_forward_hook(count_and_cancel)

    async def scenario():
        engine = GILLEngine(pipe)
        try:
            # A whole stream: text deltas, the image, then Finished with the same answer as submit gives.
            events = [e async for e in engine.stream(ChatJob([user("a dog")], dict(IMAGE_OPTIONS), seed=4))]
            same = await engine.submit(ChatJob([user("a dog")], dict(IMAGE_OPTIONS), seed=4))
            long = dict(max_new_tokens=200, do_sample=True, max_images=0)
            forwards.clear()
            full = await engine.submit(ChatJob([user("go on")], long, seed=5))
            full_forwards = len(forwards)
            job = ChatJob([user("go on")], dict(long), seed=5, stream=True)
            cancel_at["job"] = job
            forwards.clear()
            received = []
            with pytest.raises(JobCancelled):
                async for event in engine.stream(job):
                    received.append(event)
            cancelled_forwards = len(forwards)
            cancel_at.clear()
            after = await engine.submit(ChatJob([user("still serving")], dict(TEXT_OPTIONS), seed=6))
            return events, same, full, full_forwards, cancelled_forwards, received, after, engine.stats()
        finally:
            await engine.shutdown(grace_s=5)

    try:
        events, same, full, full_forwards, cancelled_forwards, received, after, stats = run(scenario())
    finally:
        hook.remove()
    assert isinstance(events[-1], Finished) and all(not isinstance(e, Finished) for e in events[:-1])
    assert any(isinstance(e, ImageReady) and e.part["type"] == "image" for e in events)
    streamed = "".join(e.text for e in events if isinstance(e, TextDelta))
    answered = "".join(p["text"] for p in same.message["content"] if p["type"] == "text")
    assert streamed.split() == answered.split()
    assert_same_answer(events[-1].result, same)
    assert full.completion_tokens > 20 and full_forwards > 20  # the long answer ran far
    # The cancelled stream stopped at its next token: the pass that saw the cancel, and no more than one after it.
    assert 5 <= cancelled_forwards <= 6
    assert all(isinstance(e, TextDelta) for e in received)
    assert stats["jobs_cancelled"] == 1 and after.completion_tokens > 0


def test_a_failing_job_does_not_fail_its_batch(pipe):
    context = pipe.llm.config.max_position_embeddings
    good = jobs_for(TEXT_OPTIONS, 3)
    bad = ChatJob([user("dog " * (context + 5))], dict(TEXT_OPTIONS), seed=99)  # longer than the LM's context

    async def scenario():
        engine = GILLEngine(pipe, max_batch_size=4, batch_wait_ms=500, prefix_cache_bytes=0)
        try:
            results = await asyncio.gather(*[engine.submit(job) for job in [good[0], bad, good[1], good[2]]],
                                           return_exceptions=True)
            return results, engine.stats()
        finally:
            await engine.shutdown(grace_s=5)

    results, stats = run(scenario())
    alone, _ = run(answer_all(pipe, jobs_for(TEXT_OPTIONS, 3), max_batch_size=1, prefix_cache_bytes=0))
    assert isinstance(results[1], ValueError) and "`prompt`" in str(results[1]) and "context" in str(results[1])
    for got, ref in zip([results[0], results[2], results[3]], alone):
        assert_same_answer(got, ref)
    assert stats["jobs_failed"] == 1 and stats["jobs_completed"] == 3


class FailOnce:
    """A denoising-step callback that raises the first time only: a batch that fails after its text was streamed."""

    def __init__(self):
        self.failed = False

    def __call__(self, pipe, step, timestep, callback_kwargs):
        if not self.failed:
            self.failed = True
            raise RuntimeError("a transient failure")
        return callback_kwargs


def test_streams_of_a_failed_batch_continue_where_they_were(pipe):
    async def scenario(callback, **engine_kwargs):
        engine = GILLEngine(pipe, prefix_cache_bytes=0, **engine_kwargs)
        try:
            jobs = [ChatJob(j.messages, dict(IMAGE_OPTIONS, callback_on_step_end=callback), seed=j.seed)
                    for j in jobs_for(IMAGE_OPTIONS, 3)]

            async def collect(job):
                return [event async for event in engine.stream(job)]

            return await asyncio.gather(*[collect(job) for job in jobs]), engine.stats()
        finally:
            await engine.shutdown(grace_s=5)

    retried, stats = run(scenario(FailOnce(), max_batch_size=3, batch_wait_ms=500))
    alone, _ = run(scenario(None, max_batch_size=1))
    assert stats["batches_run"] == 4 and stats["jobs_completed"] == 3  # the failed batch, then each job alone
    text = lambda events: "".join(e.text for e in events if isinstance(e, TextDelta))  # noqa: E731
    for a, b in zip(retried, alone):
        assert text(a) == text(b) and len(text(a)) > 0
        assert_same_answer(a[-1].result, b[-1].result)


def test_bad_messages_fail_only_their_job(pipe):
    async def scenario():
        engine = GILLEngine(pipe, max_batch_size=2, batch_wait_ms=300)
        try:
            bad = ChatJob([{"role": "user", "content": [{"type": "image", "image": "not an image"}]}], {})
            return await asyncio.gather(engine.submit(bad), engine.submit(ChatJob([user("fine")], dict(TEXT_OPTIONS))),
                                        return_exceptions=True)
        finally:
            await engine.shutdown(grace_s=5)

    bad, good = run(scenario())
    assert isinstance(bad, (ValueError, TypeError)) and "prompt" in str(bad)
    assert good.completion_tokens > 0


def test_full_queue_raises_queue_full_at_once(pipe):
    async def scenario():
        gate = Gate()
        engine = GILLEngine(pipe, max_batch_size=1, max_queue=2)
        try:
            blocker = asyncio.ensure_future(engine.submit(gated_job(gate)))
            await gate.wait_entered()
            queued = [asyncio.ensure_future(engine.submit(ChatJob([user(f"q{i}")], dict(TEXT_OPTIONS)))) for i in range(2)]
            await asyncio.sleep(0.05)
            with pytest.raises(QueueFull) as full:
                await engine.submit(ChatJob([user("one too many")], dict(TEXT_OPTIONS)))
            with pytest.raises(QueueFull):
                engine.stream(ChatJob([user("a stream too many")], dict(TEXT_OPTIONS)))
            stats = engine.stats()
            gate.release.set()
            await asyncio.gather(blocker, *queued)
            return full.value, stats
        finally:
            gate.release.set()
            await engine.shutdown(grace_s=5)

    error, stats = run(scenario())
    assert error.retry_after >= 1 and "queue is full" in str(error)
    assert stats["queue_depth"] == 2 and stats["jobs_rejected"] == 2


def test_shutdown_cancels_queued_and_in_flight_jobs_after_grace(pipe):
    async def scenario():
        gate = Gate()
        engine = GILLEngine(pipe, max_batch_size=1)
        blocker = asyncio.ensure_future(engine.submit(gated_job(gate)))
        await gate.wait_entered()
        queued = [asyncio.ensure_future(engine.submit(ChatJob([user(f"q{i}")], dict(TEXT_OPTIONS)))) for i in range(2)]
        stream = engine.stream(ChatJob([user("streamed")], dict(TEXT_OPTIONS)))
        await asyncio.sleep(0.05)
        closing = asyncio.ensure_future(engine.shutdown(grace_s=0.2))
        await asyncio.sleep(0.05)
        with pytest.raises(EngineClosed):
            await engine.submit(ChatJob([user("too late")], {}))
        outcomes = await asyncio.gather(blocker, *queued, return_exceptions=True)
        with pytest.raises(JobCancelled):
            await stream.__anext__()
        gate.release.set()
        await closing
        return outcomes, engine.stats()

    outcomes, stats = run(scenario())
    assert all(isinstance(o, JobCancelled) for o in outcomes), outcomes
    assert stats["closed"] and stats["queue_depth"] == 0


def test_shutdown_lets_jobs_finish_within_grace(pipe):
    async def scenario():
        engine = GILLEngine(pipe, max_batch_size=2, batch_wait_ms=1)
        pending = [asyncio.ensure_future(engine.submit(job)) for job in jobs_for(TEXT_OPTIONS, 3)]
        await asyncio.sleep(0)
        await engine.shutdown(grace_s=30)
        return await asyncio.gather(*pending, return_exceptions=True)

    results = run(scenario())
    assert all(r.completion_tokens > 0 for r in results), results


def test_per_job_timeout(pipe):
    async def scenario():
        gate = Gate()
        engine = GILLEngine(pipe, max_batch_size=1, request_timeout_s=2.0)  # room for the next job on a busy machine
        try:
            with pytest.raises(TimeoutError):
                await engine.submit(gated_job(gate))
            gate.release.set()
            # The timed-out job stopped at its next denoising step; the engine serves the next one.
            job = ChatJob([user("after")], dict(TEXT_OPTIONS))
            return await engine.submit(job), job, engine.stats()
        finally:
            gate.release.set()
            await engine.shutdown(grace_s=5)

    result, job, stats = run(scenario())
    assert result.completion_tokens > 0
    assert stats["jobs_timed_out"] == 1 and stats["jobs_cancelled"] == 0 and stats["jobs_completed"] == 1


def test_cancelling_the_awaiting_task_cancels_the_job(pipe):
    async def scenario():
        gate = Gate()
        engine = GILLEngine(pipe, max_batch_size=1)
        try:
            job = gated_job(gate)
            task = asyncio.ensure_future(engine.submit(job))
            await gate.wait_entered()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert job.cancelled.is_set()
            gate.release.set()
            return await engine.submit(ChatJob([user("next")], dict(TEXT_OPTIONS)))
        finally:
            gate.release.set()
            await engine.shutdown(grace_s=5)

    assert run(scenario()).completion_tokens > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_batch_size=0), "`max_batch_size` must be an int >= 1, got 0"),
        (dict(max_queue=1.5), "`max_queue` must be an int >= 1, got 1.5"),
        (dict(batch_wait_ms=-1), "`batch_wait_ms` must be a finite number of seconds >= 0, got -1"),
        (dict(request_timeout_s=0), "`request_timeout_s` must be a finite number of seconds > 0, got 0"),
        (dict(prefix_cache_bytes="1GB"), "`prefix_cache_bytes` must be an int >= 0, got '1GB'"),
    ],
)
def test_bad_engine_arguments_are_named(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        GILLEngine(pipe, **kwargs)


def test_bad_engine_inputs_are_named(pipe):
    with pytest.raises(TypeError, match="`pipe` must be a `GILLPipeline`, got str"):
        GILLEngine("pipe")

    async def scenario():
        engine = GILLEngine(pipe)
        try:
            with pytest.raises(TypeError, match="`job` must be a `ChatJob`, got dict"):
                await engine.submit({"messages": []})
            with pytest.raises(ValueError, match="grace_s"):
                await engine.shutdown(grace_s=-1)
        finally:
            await engine.shutdown(grace_s=1)

    run(scenario())


def test_bundled_model_batched_and_cached_answers_equal_one_at_a_time():
    """On the shapes-world model (text, then a retrieved and a generated image): three jobs batched answer as each
    alone, and a second turn that continues a cached prefix answers as recomputed."""
    from gill_pipeline.bundled import bundle_available, load_bundled_pipeline
    from gill_pipeline.bundled.presets import SHAPES_MODEL, example_image

    if not bundle_available():
        pytest.fail("The bundled shapes-world pipeline is missing: run `python -m training.shapes.retrain_all`.")
    shapes = load_bundled_pipeline()
    image = example_image(SHAPES_MODEL)
    options = dict(max_new_tokens=8, img_logit_scale=2.0, max_images=1, image_mode="both", num_inference_steps=4,
                   guidance_scale=5.0, do_sample=True, temperature=0.7)
    images = [image, image.transpose(0), image.transpose(1)]

    def jobs():
        return [ChatJob([{"role": "user", "content": [{"type": "image", "image": im}]}], dict(options), seed=i)
                for i, im in enumerate(images)]

    batched, stats = run(answer_all(shapes, jobs(), max_batch_size=3, batch_wait_ms=500, prefix_cache_bytes=0))
    alone, _ = run(answer_all(shapes, jobs(), max_batch_size=1, prefix_cache_bytes=0))
    assert stats["mean_batch_size"] == 3.0
    for a, b in zip(batched, alone):
        assert_same_answer(a, b)
    assert any(p["type"] == "image" for r in batched for p in r.message["content"])

    first = jobs()[0].messages
    second = first + [alone[0].message, {"role": "user", "content": [{"type": "image", "image": images[1]}]}]
    engine_kwargs = dict(max_batch_size=1, prefix_cache_bytes=1 << 26)

    async def two_turns():
        engine = GILLEngine(shapes, **engine_kwargs)
        try:
            await engine.submit(ChatJob(first, dict(options), seed=0))
            return await engine.submit(ChatJob(second, dict(options), seed=5)), engine.stats()
        finally:
            await engine.shutdown(grace_s=5)

    hit, hit_stats = run(two_turns())
    (recomputed,), _ = run(answer_all(shapes, [ChatJob(second, dict(options), seed=5)], prefix_cache_bytes=0))
    assert hit_stats["cache_hits"] == 1
    assert_same_answer(hit, recomputed)
