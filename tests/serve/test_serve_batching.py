"""Batching, the bounded queue (429), the time limit (504) and cancellation, against real servers."""
from __future__ import annotations

import threading
import time

import httpx


def fire(server, bodies: list[dict], timeout: float = 60) -> list[httpx.Response]:
    """Send every body at the same moment (one thread and connection each); the responses in order."""
    barrier = threading.Barrier(len(bodies))
    out: list = [None] * len(bodies)

    def send(i):
        with server.client(timeout=timeout) as c:
            barrier.wait()
            out[i] = c.post("/v1/generate", json=bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5)
    return out


def test_concurrent_compatible_requests_share_pipeline_calls(make_server):
    server = make_server(max_batch=8, queue_size=64, batch_wait=0.05)
    n = 8
    responses = fire(server, [{"prompt": f"shape {i}", "seed": 10 * i, "steps": 20} for i in range(n)])
    assert [r.status_code for r in responses] == [200] * n
    assert [r.json()["images"][0]["seed"] for r in responses] == [10 * i for i in range(n)]
    calls = server.metric("ernielab_serve_batch_images_count")
    assert server.metric("ernielab_serve_batch_images_sum") == n
    assert server.metric("ernielab_serve_images_generated_total") == n
    assert 1 <= calls < n, f"{n} requests took {calls} pipeline calls"

    # incompatible settings are never mixed: two sizes -> at least two calls
    before = server.metric("ernielab_serve_batch_images_count")
    responses = fire(server, [{"prompt": "a", "width": 16}, {"prompt": "b", "width": 24}])
    assert [r.json()["images"][0]["width"] for r in responses] == [16, 24]
    assert server.metric("ernielab_serve_batch_images_count") - before == 2


def test_batched_image_matches_unbatched(make_server):
    """Image i of a request uses seed + i whatever else is in its batch."""
    server = make_server(max_batch=8, queue_size=64, batch_wait=0.05)
    responses = fire(server, [{"prompt": "a red circle", "seed": 5}] + [{"prompt": f"other {i}", "seed": i}
                                                                         for i in range(5)])
    assert server.metric("ernielab_serve_batch_images_count") < 6
    with server.client() as c:
        alone = c.post("/v1/generate", json={"prompt": "a red circle", "seed": 5}).json()
    import base64
    import io

    import numpy as np
    from PIL import Image

    def pixels(r):
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(r["images"][0]["b64_png"])))).astype(int)

    assert np.abs(pixels(responses[0].json()) - pixels(alone)).max() <= 2  # float rounding only


def test_full_queue_answers_429_and_every_request_one_response(make_server):
    server = make_server(max_batch=1, queue_size=1, batch_wait=0.0, limits=_limits())
    responses = fire(server, [{"prompt": f"slow {i}", "steps": 300} for i in range(6)])
    codes = sorted(r.status_code for r in responses)
    assert all(r is not None for r in responses)
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}, codes
    refused = [r for r in responses if r.status_code == 429]
    assert all("queue is full" in r.json()["error"]["message"] for r in refused)
    assert server.metric("ernielab_serve_rejected_queue_full_total") == len(refused)
    assert server.healthy()
    with server.client() as c:  # the queue drains: new requests are served again
        assert c.post("/v1/generate", json={"prompt": "after"}).status_code == 200


def _limits():
    from ernielab.serve.app import ServerLimits

    return ServerLimits(max_steps=100000)


def test_client_disconnect_cancels_and_frees_the_slot(make_server):
    server = make_server(max_batch=4, queue_size=1, batch_wait=0.0, limits=_limits())
    slow = {"prompt": "very slow", "steps": 50000}  # minutes if it ran to the end
    errors = []

    def give_up(body):
        try:
            with server.client(timeout=0.7) as c:
                c.post("/v1/generate", json=body)
        except httpx.TimeoutException as e:
            errors.append(e)

    # one running, one queued: both are dropped when their clients go away
    threads = [threading.Thread(target=give_up, args=({**slow, "seed": i},)) for i in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.2)  # the first is running before the second is queued
    for t in threads:
        t.join(10)
    assert len(errors) == 2
    deadline = time.monotonic() + 10
    while server.metric("ernielab_serve_cancelled_total") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("ernielab_serve_cancelled_total") == 2
    # the running call stopped early (and the queued one, if it had started by then)
    assert server.metric("ernielab_serve_aborted_batches_total") >= 1
    assert server.metric("ernielab_serve_images_generated_total") == 0
    assert server.metric("ernielab_serve_queue_length") == 0
    t0 = time.monotonic()
    with server.client() as c:  # the worker and the queue slot are free again
        assert c.post("/v1/generate", json={"prompt": "next"}).status_code == 200
    assert time.monotonic() - t0 < 5


def test_sse_client_disconnect_cancels(make_server):
    server = make_server(max_batch=4, queue_size=4, batch_wait=0.0, limits=_limits())
    with server.client() as c:
        with c.stream("POST", "/v1/generate?stream=true", json={"prompt": "slow", "steps": 50000}) as r:
            for line in r.iter_lines():
                if line.startswith("event: progress"):
                    break  # leave after the first step
    deadline = time.monotonic() + 10
    while server.metric("ernielab_serve_aborted_batches_total") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("ernielab_serve_aborted_batches_total") == 1
    assert server.healthy()


def test_time_limit_answers_504(make_server):
    server = make_server(max_batch=4, queue_size=4, batch_wait=0.0, timeout=0.5, limits=_limits())
    with server.client() as c:
        t0 = time.monotonic()
        r = c.post("/v1/generate", json={"prompt": "slow", "steps": 50000})
        assert r.status_code == 504 and "limit" in r.json()["error"]["message"]
        assert time.monotonic() - t0 < 5
        deadline = time.monotonic() + 10
        while server.metric("ernielab_serve_aborted_batches_total") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.metric("ernielab_serve_aborted_batches_total") == 1
        assert c.post("/v1/generate", json={"prompt": "fast", "steps": 2}).status_code == 200
        with c.stream("POST", "/v1/generate?stream=true", json={"prompt": "slow", "steps": 50000}) as r:
            lines = list(r.iter_lines())  # the stream ends with one error event
        assert lines[-3] == "event: error" and '"code": 504' in lines[-2]
        assert server.metric("ernielab_serve_timeouts_total") == 2


def test_event_loop_never_waits_on_the_model(make_server):
    server = make_server(max_batch=4, queue_size=4, batch_wait=0.0, timeout=2.0, limits=_limits())
    codes = []
    slow = threading.Thread(target=lambda: codes.append(
        httpx.post(server.url + "/v1/generate", json={"prompt": "slow", "steps": 50000},
                   headers={"Authorization": "Bearer test-key"}, timeout=30).status_code))
    slow.start()
    time.sleep(0.3)
    for _ in range(5):  # while the worker thread denoises, the server still answers at once
        t0 = time.monotonic()
        assert server.healthy()
        assert time.monotonic() - t0 < 0.5
        time.sleep(0.1)
    slow.join(30)
    assert codes == [504]
