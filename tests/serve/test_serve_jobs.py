"""Async jobs: POST /v1/generate?async=true answers 202 with a job id at once; GET /v1/jobs/{id}/events streams
queued, started, progress per step and done (or error) from the first event, however late it is opened;
GET /v1/jobs/{id} is the state and result; DELETE cancels; unknown ids are 404."""
from __future__ import annotations

import base64
import io
import json
import time

import httpx
import pytest
from PIL import Image

from ernielab.serve.app import ServerLimits


def sse_events(response) -> list[tuple[str, dict]]:
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            events.append((name, json.loads(line[5:])))
    return events


def submit(c: httpx.Client, body: dict) -> dict:
    r = c.post("/v1/generate", params={"async": "true"}, json=body)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}" and job["events"] == f"/v1/jobs/{job['id']}/events"
    return job


def events_of(c: httpx.Client, job_id: str) -> list[tuple[str, dict]]:
    with c.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return sse_events(r)


def test_async_job_events_from_queued_to_done(server):
    with server.client() as c:
        job = submit(c, {"prompt": "a green triangle", "steps": 5, "seed": 2, "n": 2, "width": 16})
        assert job["status"] in ("queued", "running") and job["images"] == 2 and job["steps"] == 5
        events = events_of(c, job["id"])
        names = [n for n, _ in events]
        assert names[:2] == ["queued", "started"] and names[-1] == "done", names
        assert [d["step"] for n, d in events if n == "progress"] == [1, 2, 3, 4, 5]
        assert all(d["id"] == job["id"] for _, d in events)
        done = events[-1][1]
        assert [im["seed"] for im in done["images"]] == [2, 3] and done["steps"] == 5
        image = Image.open(io.BytesIO(base64.b64decode(done["images"][0]["b64_png"])))
        assert image.size == (16, 32)
        # the same images as the same request answered directly
        direct = c.post("/v1/generate", json={"prompt": "a green triangle", "steps": 5, "seed": 2, "n": 2,
                                              "width": 16}).json()
        assert [im["b64_png"] for im in direct["images"]] == [im["b64_png"] for im in done["images"]]
        # a finished job: its state and result, and its whole event stream again
        status = c.get(f"/v1/jobs/{job['id']}").json()
        assert status["status"] == "done" and status["step"] == status["steps"] == 5
        assert status["result"]["images"] == done["images"]
        assert events_of(c, job["id"]) == events
    assert server.metric('ernielab_serve_requests_total{endpoint="generate_async",status="200"}') == 1


def test_leaving_the_event_stream_does_not_cancel(server):
    with server.client() as c:
        job = submit(c, {"prompt": "a blue square", "steps": 8, "seed": 4})
        with c.stream("GET", f"/v1/jobs/{job['id']}/events") as r:
            for line in r.iter_lines():
                if line.startswith("event: started"):
                    break  # gone before the end
        deadline = time.monotonic() + 30
        while (status := c.get(f"/v1/jobs/{job['id']}").json())["status"] != "done":
            assert status["status"] in ("queued", "running") and time.monotonic() < deadline, status
            time.sleep(0.05)
        assert len(status["result"]["images"]) == 1


def test_unknown_jobs_are_404(server):
    with server.client() as c:
        for method, path in (("GET", "/v1/jobs/nope"), ("GET", "/v1/jobs/nope/events"),
                             ("DELETE", "/v1/jobs/nope"), ("GET", "/v1/jobs/" + "f" * 32 + "/events")):
            r = c.request(method, path)
            assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error", (method, path, r.text)
    job = None
    with server.client() as c:
        job = submit(c, {"prompt": "x", "steps": 1})
    r = httpx.get(f"{server.url}/v1/jobs/{job['id']}/events", timeout=10)  # no API key
    assert r.status_code == 401


@pytest.mark.parametrize("params,body,words", [
    ({"async": "true", "stream": "true"}, {"prompt": "x"}, "not both"),
    ({"async": "true"}, {"prompt": "x", "steps": 0}, "steps"),
    ({"async": "true"}, {"prompts": []}, "list"),
    ({"async": "maybe"}, {"prompt": "x"}, "async"),
])
def test_async_bad_requests_queue_nothing(server, params, body, words):
    with server.client() as c:
        r = c.post("/v1/generate", params=params, json=body)
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text


def test_async_job_time_limit_and_cancel_end_with_error(make_server):
    server = make_server(max_batch=1, queue_size=4, batch_wait=0.0, timeout=0.5, job_ttl=0.0,
                         limits=ServerLimits(max_steps=100000))
    with server.client() as c:
        job = submit(c, {"prompt": "slow", "steps": 50000})
        events = events_of(c, job["id"])
        assert events[-1] == ("error", {"error": {"message": "the request took longer than the server's limit "
                                                             "of 0.5 s", "code": 504}})
        status = c.get(f"/v1/jobs/{job['id']}").json()
        assert status["status"] == "error" and status["error"]["code"] == 504
        submit(c, {"prompt": "fast", "steps": 1})  # finished jobs past job_ttl are dropped
        assert c.get(f"/v1/jobs/{job['id']}").status_code == 404

    server = make_server(max_batch=1, queue_size=4, batch_wait=0.0, limits=ServerLimits(max_steps=100000))
    with server.client() as c:
        running = submit(c, {"prompt": "slow", "steps": 50000})
        queued = submit(c, {"prompt": "slow too", "steps": 50000})
        with c.stream("GET", f"/v1/jobs/{running['id']}/events") as r:
            for line in r.iter_lines():
                if line.startswith("event: progress"):
                    break
        for job in (queued, running):
            r = c.delete(f"/v1/jobs/{job['id']}")
            assert r.status_code == 200 and r.json()["id"] == job["id"]
        for job in (queued, running):
            events = events_of(c, job["id"])
            assert events[0][0] == "queued" and events[-1][0] == "error"
            assert events[-1][1]["error"]["code"] == 499
            assert c.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"
        assert server.metric("ernielab_serve_aborted_batches_total") == 1
        assert c.post("/v1/generate", json={"prompt": "next", "steps": 2}).status_code == 200
