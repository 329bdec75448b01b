"""`gill serve` driven by real clients: the official `openai` package (sync and async, streamed and not) and raw HTTP,
against a uvicorn server in this process on a free port, on the tiny random pipeline and the bundled shapes world."""

import asyncio
import base64
import importlib.util
import io

import httpx
import numpy as np
import openai
import PIL.Image
import pytest
import torch

from conftest import random_image
from gill_pipeline.bundled import bundle_available, load_bundled_pipeline
from gill_pipeline.bundled.presets import SHAPES_MODEL, example_image
from serve_helpers import MODEL_ID, TINY_DEFAULTS, decode_data_url, png_data_url, served, sse_events

MESSAGES = [{"role": "user", "content": "Show me a dog in the snow."}]


@pytest.fixture(scope="module", params=["serial", "batched"])
def server(request, opt_pipe):
    """The app over each engine: one job at a time, and the batched engine (where this checkout has it)."""
    engine = None
    if request.param == "batched":
        if importlib.util.find_spec("gill_pipeline.serving.engine") is None:
            pytest.skip("gill_pipeline.serving.engine (the batched engine) is not in this checkout")
        from gill_pipeline.serving.engine import GILLEngine

        engine = GILLEngine(opt_pipe, max_batch_size=4, batch_wait_ms=20)
    with served(opt_pipe, engine=engine) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference(opt_pipe):
    """The library's own answer to MESSAGES with the server's defaults and seed 0: what every route must give."""
    out = opt_pipe(MESSAGES, **TINY_DEFAULTS, generator=torch.Generator().manual_seed(0))
    return out.messages[0]


def texts_and_images(content):
    texts = [p["text"] for p in content if p["type"] == "text"]
    images = [p for p in content if p["type"] in ("image", "image_url")]
    return texts, images


def assert_same_answer(content, reference):
    texts, images = texts_and_images(content)
    ref_texts, ref_images = texts_and_images(reference["content"])
    assert texts == ref_texts
    assert len(images) == len(ref_images) == 1
    served_image = np.asarray(decode_data_url(images[0]["image_url"]["url"]))
    np.testing.assert_array_equal(served_image, np.asarray(ref_images[0]["image"]))
    gill = images[0]["gill"]
    assert gill["source"] == ref_images[0]["source"] == "generated"
    assert gill["decision_probs"]["generate"] == pytest.approx(ref_images[0]["decision_probs"][0], abs=1e-6)
    assert gill["decision_probs"]["generate"] + gill["decision_probs"]["retrieve"] == pytest.approx(1.0, abs=1e-5)


def test_sync_client_answers_text_and_an_image_as_the_pipeline_does(client, reference):
    answer = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, seed=0)
    assert answer.object == "chat.completion" and answer.model == MODEL_ID and answer.id.startswith("chatcmpl-")
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, list)
    # The parts in answer order: text, the image, text (the tiny model's [IMG0] is boosted after 2 text tokens).
    assert [p["type"] for p in choice.message.content] == ["text", "image_url", "text"]
    assert_same_answer(choice.message.content, reference)
    # 6 new tokens, the [IMG] group counting as one: 5 text tokens + 1 group of 4 [IMG] tokens = 9 tokens.
    assert choice.finish_reason == "length"
    assert answer.usage.completion_tokens == 5 + 4
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert answer.usage.prompt_tokens > 0


def test_sync_client_streams_the_same_answer(client, reference):
    stream = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, seed=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)  # image chunks keep content a string
    images = [c.choices[0].delta.model_extra["image"] for c in chunks if (c.choices[0].delta.model_extra or {}).get("image")]
    assert text == "".join(texts_and_images(reference["content"])[0])
    assert_same_answer([{"type": "text", "text": t} for t in texts_and_images(reference["content"])[0]] + images, reference)
    last = chunks[-1]
    assert last.choices[0].finish_reason == "length" and all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert last.usage.completion_tokens == 9 and last.usage.prompt_tokens > 0


def test_async_client_concurrent_requests_streamed_and_not(server, reference):
    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        plain = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, seed=0)

        async def streamed():
            stream = await client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, seed=0, stream=True)
            return [chunk async for chunk in stream]

        answer, chunks = await asyncio.gather(plain, streamed())
        await client.close()
        return answer, chunks

    answer, chunks = asyncio.run(main())
    assert_same_answer(answer.choices[0].message.content, reference)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "".join(texts_and_images(reference["content"])[0])


def test_image_input_and_gill_options_in_extra_body(client, opt_pipe):
    image = random_image(3, 40)
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "This is my dog."},
        {"type": "image_url", "image_url": {"url": png_data_url(image)}},
        {"type": "text", "text": "Describe him."},
    ]}]
    answer = client.chat.completions.create(
        model=MODEL_ID, messages=messages, seed=1, max_completion_tokens=4, extra_body={"max_images": 0}
    )
    content = answer.choices[0].message.content
    assert all(p["type"] == "text" for p in content)  # max_images=0: text only
    expected = opt_pipe(
        [{"role": "user", "content": [{"type": "text", "text": "This is my dog."}, {"type": "image", "image": image},
                                      {"type": "text", "text": "Describe him."}]}],
        **{**TINY_DEFAULTS, "max_new_tokens": 4, "max_images": 0}, generator=torch.Generator().manual_seed(1),
    )
    assert "".join(p["text"] for p in content) == expected.texts[0]
    # The image is read: its visual prefix counts in the prompt (more than the text alone).
    text_only = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "This is my dog.Describe him."}], max_tokens=1,
        extra_body={"max_images": 0},
    )
    assert answer.usage.prompt_tokens >= text_only.usage.prompt_tokens + opt_pipe.num_img_tokens - 2


def test_sampling_fields_map_to_pipe_options(client):
    """temperature > 0 samples (seeded: repeatable); temperature 0 or unset is greedy."""
    kwargs = dict(model=MODEL_ID, messages=MESSAGES, max_tokens=5, extra_body={"max_images": 0})
    greedy = client.chat.completions.create(**kwargs, temperature=0).choices[0].message.content
    assert client.chat.completions.create(**kwargs).choices[0].message.content == greedy
    sampled = [client.chat.completions.create(**kwargs, temperature=1.5, top_p=0.9, seed=7).choices[0].message.content
               for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_images_generations_b64_and_url(server, client):
    result = client.images.generate(model=MODEL_ID, prompt="a red circle", response_format="b64_json", size="32x32")
    image = PIL.Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert image.size == (32, 32) and image.format == "PNG"
    assert result.data[0].model_extra["gill"]["source"] == "generated"
    by_url = client.images.generate(model=MODEL_ID, prompt="a red circle", response_format="url", size="32x32", extra_body={"seed": 0})
    assert by_url.data[0].url.startswith(server.url + "/v1/files/file-")
    fetched = httpx.get(by_url.data[0].url)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert PIL.Image.open(io.BytesIO(fetched.content)).size == (32, 32)


def test_image_urls_serves_answer_images_as_files(opt_pipe, reference):
    with served(opt_pipe, image_urls=True, api_key="k") as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0)
        content = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, seed=0).choices[0].message.content
        url = texts_and_images(content)[1][0]["image_url"]["url"]
        assert url.startswith(server.url + "/v1/files/file-")
        assert httpx.get(url).status_code == 401  # the files are behind the key too
        png = httpx.get(url, headers={"Authorization": "Bearer k"})
        assert png.status_code == 200
        served_image = np.asarray(PIL.Image.open(io.BytesIO(png.content)).convert("RGB"))
        np.testing.assert_array_equal(served_image, np.asarray(texts_and_images(reference["content"])[1][0]["image"]))


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).owned_by == "gill_pipeline"
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL_ID and "engine" in health


def test_sse_wire_format_byte_level(server):
    """What `curl -N` sees: `data: <json>` events separated by blank lines, in OpenAI's chunk format, `[DONE]` last."""
    body = {"model": MODEL_ID, "messages": MESSAGES, "seed": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        raw = b"".join(response.iter_bytes())
    assert raw.startswith(b'data: {"id":"chatcmpl-') and raw.endswith(b"data: [DONE]\n\n")
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    kinds = ["image" if "image" in c["choices"][0]["delta"] else "text" for c in chunks[1:-1]]
    assert kinds.count("image") == 1
    image_delta = next(c["choices"][0]["delta"] for c in chunks if "image" in c["choices"][0]["delta"])
    assert image_delta["content"] == "" and image_delta["image"]["type"] == "image_url"
    final = chunks[-1]
    assert final["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "length", "logprobs": None}
    assert final["usage"]["total_tokens"] == final["usage"]["prompt_tokens"] + final["usage"]["completion_tokens"]


@pytest.fixture(scope="module")
def shapes_server():
    if not bundle_available():
        pytest.fail("The bundled shapes-world pipeline is missing: run `python -m training.shapes.retrain_all`.")
    pipe = load_bundled_pipeline()
    pipe.set_progress_bar_config(disable=True)
    # The bundled model's preset (as `gill serve` uses it), with fewer denoising steps to stay fast.
    defaults = dict(max_new_tokens=8, min_text_tokens=0, img_logit_scale=2.0, max_images=1, image_mode="both",
                    num_inference_steps=4, guidance_scale=5.0)
    with served(pipe, model_id=SHAPES_MODEL, defaults=defaults) as server:
        yield server


def test_shapes_world_answers_with_a_description_and_an_image(shapes_server):
    """The README's query: the example scene in, GILL describes it and answers with an image (retrieved or generated,
    the other kind as its alternative), each with GILL's metadata."""
    client = openai.OpenAI(base_url=shapes_server.url + "/v1", api_key="unused", max_retries=0)
    answer = client.chat.completions.create(
        model=SHAPES_MODEL, seed=0,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url(example_image(SHAPES_MODEL))}}]}],
    )
    texts, images = texts_and_images(answer.choices[0].message.content)
    assert "circle" in " ".join(texts)  # the example is a small red circle
    assert len(images) == 1
    shown = images[0]
    kinds = {shown["gill"]["source"], shown["gill"]["alternatives"][0]["gill"]["source"]}
    assert kinds == {"generated", "retrieved"}
    retrieved = shown if shown["gill"]["source"] == "retrieved" else shown["gill"]["alternatives"][0]
    assert isinstance(retrieved["gill"]["caption"], str) and retrieved["gill"]["caption"]
    assert decode_data_url(shown["image_url"]["url"]).size[0] > 0


@pytest.mark.parametrize("fields, expected", [
    ({}, {"do_sample": False}),
    ({"temperature": 0}, {"do_sample": False}),
    ({"temperature": 0, "top_p": 0.5}, {"do_sample": False}),
    ({"temperature": 0.7}, {"do_sample": True, "temperature": 0.7, "top_p": 1.0}),
    ({"top_p": 0.9}, {"do_sample": True, "temperature": 1.0, "top_p": 0.9}),
    ({"temperature": 1.2, "top_p": 0.5}, {"do_sample": True, "temperature": 1.2, "top_p": 0.5}),
])
def test_openai_sampling_fields_to_pipe_options(fields, expected):
    from gill_pipeline.serving.requests import parse_chat_request
    from gill_pipeline.serving.settings import ServeSettings

    settings = ServeSettings(model_id=MODEL_ID, defaults={"num_inference_steps": 3, "max_new_tokens": 7})
    job = parse_chat_request({"model": MODEL_ID, "messages": MESSAGES, **fields}, settings)
    sampling = {k: job.options[k] for k in ("do_sample", "temperature", "top_p") if k in job.options}
    assert sampling == expected
    assert job.options["num_inference_steps"] == 3 and job.options["max_new_tokens"] == 7  # the server's defaults
    assert job.seed is None and job.stream is False


def test_max_tokens_names_and_image_request_mapping():
    from gill_pipeline.serving.errors import ApiError
    from gill_pipeline.serving.requests import parse_chat_request, parse_image_generation_request
    from gill_pipeline.serving.settings import ServeSettings

    settings = ServeSettings(model_id=MODEL_ID, max_tokens_cap=50)
    body = {"messages": MESSAGES}
    assert parse_chat_request({**body, "max_completion_tokens": 9}, settings).options["max_new_tokens"] == 9
    assert parse_chat_request({**body, "max_tokens": 9, "max_completion_tokens": 9}, settings).options["max_new_tokens"] == 9
    with pytest.raises(ApiError, match="differ") as error:
        parse_chat_request({**body, "max_tokens": 9, "max_completion_tokens": 8}, settings)
    assert error.value.status == 400 and error.value.param == "max_tokens"
    job, response_format = parse_image_generation_request({"prompt": "a red circle", "size": "64x32", "seed": 3}, settings)
    assert response_format == "b64_json" and job.seed == 3
    assert job.messages == [{"role": "user", "content": "a red circle"}]
    assert job.options["image_mode"] == "generate" and job.options["max_new_tokens"] == 1
    assert (job.options["width"], job.options["height"]) == (64, 32)


@pytest.mark.parametrize("kwargs, words", [
    (dict(port=70000), ["port", "70000"]),
    (dict(api_key=""), ["api_key"]),
    (dict(max_queue=0), ["max_queue", "0"]),
    (dict(request_timeout_s=float("nan")), ["request_timeout_s", "nan"]),
    (dict(host=""), ["host"]),
])
def test_serve_settings_refuse_bad_values(kwargs, words):
    from gill_pipeline.serving.settings import ServeSettings

    with pytest.raises(ValueError) as error:
        ServeSettings(**kwargs)
    for word in words:
        assert word in str(error.value)


def test_exposed_without_key():
    from gill_pipeline.serving.settings import ServeSettings

    assert not ServeSettings(host="127.0.0.1").exposed_without_key
    assert not ServeSettings(host="::1").exposed_without_key
    assert ServeSettings(host="0.0.0.0").exposed_without_key
    assert not ServeSettings(host="0.0.0.0", api_key="k").exposed_without_key
