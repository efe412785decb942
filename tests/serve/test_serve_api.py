"""The API of `ernielab serve`, over real HTTP against a real uvicorn server: the OpenAI Images API through the
real `openai` client, the native endpoint, server-sent progress, the API key and bad inputs."""
from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
from PIL import Image

API_KEY = "test-key"  # conftest's

def decode_png(b64: str) -> Image.Image:
    raw = base64.b64decode(b64)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(raw))
    image.load()
    return image


@pytest.fixture(scope="module")
def openai():
    return pytest.importorskip("openai")


@pytest.fixture(scope="module")
def oai(server, openai):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def test_health_and_models(server, oai):
    assert server.healthy()
    assert [m.id for m in oai.models.list().data] == ["tiny"]


def test_openai_images_generate(oai):
    result = oai.images.generate(prompt="a red circle above a blue square", n=2, size="48x32",
                                 response_format="b64_json", model="anything", quality="high", user="u1")
    assert len(result.data) == 2 and result.created > 0
    for item in result.data:
        image = decode_png(item.b64_json)
        assert image.size == (48, 32) and image.mode == "RGB"  # size is WIDTHxHEIGHT
        assert item.revised_prompt == "a red circle above a blue square"


def test_openai_url_format_refused(oai, openai):
    with pytest.raises(openai.BadRequestError) as e:
        oai.images.generate(prompt="a cat", response_format="url")
    assert "url" in str(e.value) and "b64_json" in str(e.value)


def test_api_key_required(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.post(server.url + "/v1/generate", json={"prompt": "x"}, headers=headers, timeout=10)
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 401
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200  # open: for load balancers


def test_native_generate_every_option(server):
    with server.client() as c:
        body = {"prompts": ["a red circle", "a blue square"], "n": 2, "seed": 7, "width": 16, "height": 24,
                "steps": 3, "guidance": 3.0, "shift": 2.0, "negative_prompt": "blurry", "enhance": False}
        r = c.post("/v1/generate", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert (out["width"], out["height"], out["steps"], out["guidance"], out["shift"]) == (16, 24, 3, 3.0, 2.0)
        assert [im["seed"] for im in out["images"]] == [7, 8, 9, 10]
        assert [im["prompt"] for im in out["images"]] == ["a red circle"] * 2 + ["a blue square"] * 2
        for im in out["images"]:
            assert decode_png(im["b64_png"]).size == (16, 24)
        again = c.post("/v1/generate", json=body).json()  # the same request gives the same images
        assert [im["b64_png"] for im in again["images"]] == [im["b64_png"] for im in out["images"]]
        default = c.post("/v1/generate", json={"prompt": "a red circle"}).json()  # the model's defaults
        assert (default["width"], default["height"], default["steps"], default["seed"]) == (32, 32, 4, 0)


def test_native_generate_with_enhancer(server):
    with server.client() as c:
        r = c.post("/v1/generate", json={"prompt": "a cat", "enhance": True, "seed": 1, "n": 2})
        assert r.status_code == 200, r.text
        revised = [im["revised_prompt"] for im in r.json()["images"]]
        assert all(isinstance(t, str) and t.strip() for t in revised)


def test_enhancer_rewrites_that_contradict_the_prompt_fall_back(server):
    """As `generate --enhance` does: a rewrite that changes a stated fact is not drawn; the prompt is, and the
    response says why. The bundled enhancer rewrites this unseen wording into other scenes."""
    from ernielab.worlds.prompt_facts import contradictions

    prompt = "just one red triangle, nothing else"
    with server.client() as c:
        r = c.post("/v1/generate", json={"prompt": prompt, "enhance": True, "seed": 3, "n": 4, "steps": 2})
        assert r.status_code == 200, r.text
    images = r.json()["images"]
    for im in images:
        fallback = im["enhancer_fallback"]
        if fallback is None:
            assert contradictions(prompt, im["revised_prompt"]) == []
        else:
            assert im["revised_prompt"] == prompt and fallback["reasons"]
            assert fallback["reasons"] == contradictions(prompt, fallback["rewrite"])
    assert any(im["enhancer_fallback"] for im in images)


def sse_events(response) -> list[tuple[str, dict]]:
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            events.append((name, json.loads(line[5:])))
    return events


def test_sse_progress(server):
    with server.client() as c, c.stream("POST", "/v1/generate", params={"stream": "true"},
                                        json={"prompt": "a green triangle", "steps": 5, "seed": 2}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    names = [n for n, _ in events]
    assert names[0] == "queued" and names[1] == "started" and names[-1] == "done"
    steps = [d["step"] for n, d in events if n == "progress"]
    assert steps == [1, 2, 3, 4, 5] and all(d["steps"] == 5 for n, d in events if n == "progress")
    done = events[-1][1]
    assert done["images"][0]["seed"] == 2 and decode_png(done["images"][0]["b64_png"]).size == (32, 32)


BAD = [  # (path, raw body or JSON, status, words in the message)
    ("/v1/generate", b"{not json", 400, "JSON"),
    ("/v1/generate", b"\xff\xfe", 400, "JSON"),
    ("/v1/generate", [1, 2], 400, "object"),
    ("/v1/generate", {}, 400, "prompt"),
    ("/v1/generate", {"prompt": "x", "prompts": ["y"]}, 400, "exactly one"),
    ("/v1/generate", {"prompt": 5}, 400, "string"),
    ("/v1/generate", {"prompt": "   "}, 400, "empty"),
    ("/v1/generate", {"prompts": "abc"}, 400, "list"),
    ("/v1/generate", {"prompts": []}, 400, "list"),
    ("/v1/generate", {"prompt": "x", "steps": "ten"}, 400, "integer"),
    ("/v1/generate", {"prompt": "x", "steps": True}, 400, "integer"),
    ("/v1/generate", {"prompt": "x", "steps": 0}, 400, "steps"),
    ("/v1/generate", {"prompt": "x", "steps": 10**9}, 400, "steps"),
    ("/v1/generate", {"prompt": "x", "width": 100000, "height": 100000}, 400, "height"),
    ("/v1/generate", {"prompt": "x", "width": 512, "height": 512}, 400, "at most"),
    ("/v1/images/generations", {"prompt": "x", "size": "1024x1024"}, 400, "at most 256"),
    ("/v1/generate", {"prompt": "x", "width": 30}, 400, "multiple"),
    ("/v1/generate", {"prompt": "x", "width": -32}, 400, "width"),
    ("/v1/generate", {"prompt": "x", "guidance": "NaN"}, 400, "number"),
    ("/v1/generate", {"prompt": "x", "guidance": -1}, 400, "guidance"),
    ("/v1/generate", {"prompt": "x", "shift": 0}, 400, "shift"),
    ("/v1/generate", {"prompt": "x", "seed": -1}, 400, "seed"),
    ("/v1/generate", {"prompt": "x", "seed": 2**40}, 400, "seed"),
    ("/v1/generate", {"prompt": "x", "n": 1000}, 400, "n"),
    ("/v1/generate", {"prompt": "x", "enhance": "yes"}, 400, "enhance"),
    ("/v1/generate", {"prompt": "x", "negative_prompt": ["a"]}, 400, "negative_prompt"),
    ("/v1/generate", {"prompt": "x" * 70000}, 413, "larger"),
    ("/v1/images/generations", {"prompt": "x", "size": "big"}, 400, "size"),
    ("/v1/images/generations", {"prompt": "x", "size": "99999x99999"}, 400, "at most"),
    ("/v1/images/generations", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/images/generations", {"prompt": "x", "response_format": "jpeg"}, 400, "response_format"),
    ("/v1/images/generations", {"n": 1}, 400, "prompt"),
    ("/v1/images/generations", {"prompt": "../../etc/passwd", "size": "../../x"}, 400, "size"),
]


@pytest.mark.parametrize("path,body,status,words", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_json_4xx(server, path, body, status, words):
    with server.client() as c:
        if isinstance(body, bytes):
            r = c.post(path, content=body, headers={"Content-Type": "application/json"})
        else:
            r = c.post(path, json=body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


def test_other_bad_requests(server):
    with server.client() as c:
        assert c.get("/v1/nothing").status_code == 404 and "error" in c.get("/v1/nothing").json()
        r = c.get("/v1/generate")
        assert r.status_code == 405 and "message" in r.json()["error"]
        r = c.get("/static/..%2f..%2fapp.py")
        assert r.status_code == 404
        for ctype in ("application/xml", "text/plain", "application/x-www-form-urlencoded"):
            r = c.post("/v1/generate", content=b'{"prompt": "x"}', headers={"Content-Type": ctype})
            assert r.status_code == 415

        def chunks():  # no Content-Length: the limit holds while reading
            for _ in range(100):
                yield b" " * 1024
        r = c.post("/v1/generate", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        assert server.healthy()
        assert c.post("/v1/generate", json={"prompt": "still fine"}).status_code == 200


def test_web_page_and_static_files(server):
    r = httpx.get(server.url + "/", timeout=10)
    assert r.status_code == 200 and "<form" in r.text and "/static/app.js" in r.text
    assert "http" not in r.text.replace(server.url, "").split("<body>")[0].lower()  # no CDN
    for name in ("app.js", "style.css"):
        assert httpx.get(server.url + "/static/" + name, timeout=10).status_code == 200
