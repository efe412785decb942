"""Prometheus metrics of `ernielab serve`, in a registry of the app's own (several apps can live in one
process)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        p = "ernielab_serve_"
        self.queue_length = Gauge(p + "queue_length", "requests waiting for the model", registry=r)
        self.batch_images = Histogram(p + "batch_images", "images per pipeline call", registry=r,
                                      buckets=(1, 2, 4, 8, 16, 32, 64))
        self.batch_requests = Histogram(p + "batch_requests", "requests per pipeline call", registry=r,
                                        buckets=(1, 2, 4, 8, 16, 32, 64))
        self.pipeline_seconds = Histogram(p + "pipeline_seconds", "time of one pipeline call", registry=r,
                                          buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120))
        self.queue_wait = Histogram(p + "queue_wait_seconds", "time from queued to running", registry=r,
                                    buckets=(.005, .01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120))
        self.latency = Histogram(p + "request_seconds", "request latency (accepted generation requests)",
                                 ["endpoint"], registry=r,
                                 buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.images = Counter(p + "images_generated", "images generated", registry=r)
        self.requests = Counter(p + "requests", "generation requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.rejected = Counter(p + "rejected_queue_full", "requests refused with 429 (queue full)", registry=r)
        self.cancelled = Counter(p + "cancelled", "requests cancelled (client gone or time limit)", registry=r)
        self.timeouts = Counter(p + "timeouts", "requests that ran past the time limit (504)", registry=r)
        self.aborted_batches = Counter(p + "aborted_batches", "pipeline calls stopped because every request in "
                                       "them was cancelled", registry=r)
        self.jobs_stored = Gauge(p + "jobs_stored", "async jobs kept (running or finished, not yet expired)",
                                 registry=r)
