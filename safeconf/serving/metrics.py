"""The endpoint's Prometheus metrics (Ray's, tagged with the deployment and replica by Serve): the front's HTTP
requests and latency, and the engine's judgements by how each was decided."""

from __future__ import annotations


class Metrics:
    """The front's HTTP metrics (each request, by route and status, and its latency)."""

    LATENCY_BOUNDS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]

    def __init__(self):
        from ray.serve.metrics import Counter, Histogram

        self.requests = Counter("safeconf_requests", description="HTTP requests by route and status.",
                                tag_keys=("path", "status"))
        self.latency = Histogram("safeconf_request_latency_s", description="Request latency in seconds.",
                                 boundaries=self.LATENCY_BOUNDS, tag_keys=("path",))

    def count(self, path: str, status: int, seconds: float | None = None):
        self.requests.inc(tags={"path": path, "status": str(status)})
        if seconds is not None:
            self.latency.observe(seconds, tags={"path": path})


def judgement_counter():
    """The engine's count of judgements (it alone sees how each was decided)."""
    from ray.serve.metrics import Counter

    return Counter("safeconf_judgements", description="Judgements by method, decision (accept / defer), confidence "
                   "source, tier and who decided (safeconf / escalated).",
                   tag_keys=("method", "decision", "confidence_source", "tier", "decided_by"))
