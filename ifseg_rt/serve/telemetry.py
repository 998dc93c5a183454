"""What ifseg_rt's Triton models report on Triton's own ``/metrics`` endpoint (Prometheus text), beside Triton's
``nv_inference_*`` metrics, and the worker-health file through which ``serve`` tells its models about restarts.

=============================  =========  ================  ===================================================
metric                         kind       labels            meaning
=============================  =========  ================  ===================================================
``ifseg_requests``             counter    model, outcome    requests answered: ``ok``, ``refused`` (HTTP 400,
                                                            a bad request), ``failed`` (HTTP 500, an engine
                                                            error)
``ifseg_images``               counter    model             images segmented
``ifseg_execute_seconds``      histogram  model             time from the start of a request's batch to its
                                                            response (queue time not included)
``ifseg_worker_deaths``        gauge      model             python-backend workers of the model that died since
                                                            ``serve`` started
``ifseg_worker_restarts``      gauge      model             restarts of the model after such a death
=============================  =========  ================  ===================================================

Triton's own metrics cover the rest: ``nv_inference_pending_request_count`` (the queue depth: requests waiting or
running), ``nv_inference_queue_duration_us``, and with ``--metrics-config summary_latencies=true`` (set by
:class:`~ifseg_rt.serve.tritonserver.TritonServer`) ``nv_inference_request_summary_us`` (end-to-end latency
quantiles, queue included). Requests that Triton rejects before a model sees them (queue full, queue timeout: HTTP
503) reach no model: the bundled Triton 2.51 does not count them either (its ``failure{reason="REJECTED"}`` stays 0);
the HTTP front (:mod:`~ifseg_rt.serve.front`) counts them as ``ifseg_http_responses{code="503"}`` beside its own
refusals (``ifseg_http_refused{reason}``), on the same ``/metrics``. Over gRPC only clients can count them.

Instances of one model share each series (same family name and labels, kept by Triton's core): on the bundled
Triton 2.51 the counters even survive a restart of the model (measured: 7 -> 8 ok after a kill -9 and a restart);
should a Triton reset them, Prometheus' ``rate`` handles counter resets. The worker gauges are read again from the
health file by every new worker.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

REQUESTS = "ifseg_requests"
IMAGES = "ifseg_images"
EXECUTE_SECONDS = "ifseg_execute_seconds"
WORKER_DEATHS = "ifseg_worker_deaths"
WORKER_RESTARTS = "ifseg_worker_restarts"
OUTCOMES = ("ok", "refused", "failed")
BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
HEALTH_ENV = "IFSEG_WORKER_HEALTH"  # environment variable (inherited by the workers): path of the health file
REFUSAL_LOG_PER_S = 5  # log lines for refused requests per second (per model instance; the HTTP front has its own)


class RefusalLog:
    """One log line per refused request, at most ``per_s`` a second; the rest are counted and summed up in one line
    at the start of the next second that refuses something."""

    def __init__(self, sink: Callable[[str], None], who: str, per_s: int = REFUSAL_LOG_PER_S,
                 clock: Callable[[], float] = time.monotonic):
        self.sink, self.who, self.per_s, self.clock = sink, who, per_s, clock
        self._window: Optional[List[float]] = None  # [start, refusals in the window]

    def __call__(self, message: str) -> None:
        now = self.clock()
        window = self._window
        if window is None or now - window[0] >= 1.0:
            if window is not None and window[1] > self.per_s:
                self.sink(f"{self.who}: {int(window[1]) - self.per_s} more request(s) refused in that second")
            window = self._window = [now, 0]
        window[1] += 1
        if window[1] <= self.per_s:
            self.sink(f"{self.who}: refused a request: {message[:300]}")


def write_health(path: Path, deaths: Dict[str, int], restarts: Dict[str, int]) -> None:
    """Write the worker-health file (JSON ``{"deaths": {model: n}, "restarts": {model: n}}``) atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"deaths": deaths, "restarts": restarts}) + "\n", encoding="utf-8")
    tmp.replace(path)


def read_health(path: Optional[str], model: str) -> Dict[str, int]:
    """``{"deaths": n, "restarts": n}`` of ``model`` from the health file (zeros when there is none)."""
    out = {"deaths": 0, "restarts": 0}
    if not path:
        return out
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return out
    for key in out:
        v = (raw.get(key) or {}).get(model, 0) if isinstance(raw, dict) else 0
        out[key] = int(v) if isinstance(v, int) else 0
    return out


class ModelTelemetry:
    """The metrics of one model instance (``pb``: ``triton_python_backend_utils``). Instances of one model share
    the series (same family, same labels). A Triton without python-backend metrics gets a no-op."""

    def __init__(self, pb: Any, model: str):
        self.model = model
        self.enabled = hasattr(pb, "MetricFamily")
        if not self.enabled:
            return
        mf = pb.MetricFamily
        # the families must outlive their metrics (the stub checks): keep references on self
        self._families = [
            mf(name=REQUESTS, description="ifseg requests answered, by outcome (ok, refused: 400, failed: 500)",
               kind=mf.COUNTER),
            mf(name=IMAGES, description="ifseg images segmented", kind=mf.COUNTER),
            mf(name=EXECUTE_SECONDS, description="ifseg: seconds from the start of a request's batch to its response",
               kind=mf.HISTOGRAM),
            mf(name=WORKER_DEATHS, description="ifseg: python-backend workers of this model that died", kind=mf.GAUGE),
            mf(name=WORKER_RESTARTS, description="ifseg: restarts of this model after a worker died", kind=mf.GAUGE)]
        requests, images, seconds, deaths, restarts = self._families
        labels = {"model": model}
        self._outcomes = {o: requests.Metric(labels={**labels, "outcome": o}) for o in OUTCOMES}
        self._images = images.Metric(labels=labels)
        self._seconds = seconds.Metric(labels=labels, buckets=list(BUCKETS_S))
        health = read_health(os.environ.get(HEALTH_ENV), model)
        self._gauges = [deaths.Metric(labels=labels), restarts.Metric(labels=labels)]
        self._gauges[0].set(float(health["deaths"]))
        self._gauges[1].set(float(health["restarts"]))

    def record(self, outcomes: Sequence[str], images: int, started: float) -> None:
        """One executed batch: each request's outcome, the images segmented, ``started`` = ``time.monotonic()`` at
        the start of the batch."""
        if not self.enabled:
            return
        elapsed = time.monotonic() - started
        for o in outcomes:
            self._outcomes[o].increment(1)
            self._seconds.observe(elapsed)
        if images:
            self._images.increment(images)
