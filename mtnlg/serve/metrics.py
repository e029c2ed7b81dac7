"""Prometheus text exposition (version 0.0.4) of the server's counters, gauges and histograms: small enough to
write here rather than depend on a client library."""

from __future__ import annotations

import threading

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Counter:
    def __init__(self, name: str, doc: str, labels: tuple[str, ...] = ()):
        self.name, self.doc, self.labels = name, doc, labels
        self.values: dict[tuple, float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(labels.get(k, "") for k in self.labels)
        with self._lock:
            self.values[key] = self.values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self.values.get(tuple(labels.get(k, "") for k in self.labels), 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} counter"]
        for key, v in sorted(self.values.items()) or [((), 0.0)]:
            lines.append(f"{self.name}{_labels(dict(zip(self.labels, key)))} {v:g}")
        return lines


class Gauge:
    def __init__(self, name: str, doc: str):
        self.name, self.doc, self.v = name, doc, 0.0

    def set(self, v: float) -> None:
        self.v = float(v)

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} gauge", f"{self.name} {self.v:g}"]


class Histogram:
    def __init__(self, name: str, doc: str, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.name, self.doc, self.buckets = name, doc, buckets
        self.counts = [0] * len(buckets)
        self.count, self.sum = 0, 0.0
        self._lock = threading.Lock()

    def observe(self, v: float) -> None:
        with self._lock:
            self.count += 1
            self.sum += v
            for i, b in enumerate(self.buckets):
                if v <= b:
                    self.counts[i] += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} histogram"]
        for b, c in zip(self.buckets, self.counts):
            lines.append(f'{self.name}_bucket{{le="{b:g}"}} {c}')
        lines += [f'{self.name}_bucket{{le="+Inf"}} {self.count}', f"{self.name}_sum {self.sum:g}",
                  f"{self.name}_count {self.count}"]
        return lines


def _labels(d: dict[str, str]) -> str:
    if not d:
        return ""
    inner = ",".join(f'{k}="{v}"' for k, v in d.items())
    return "{" + inner + "}"


class Metrics:
    def __init__(self):
        self.requests = Counter("mtnlg_requests_total", "HTTP requests answered, by endpoint and status code",
                                ("endpoint", "status"))
        self.prompt_tokens = Counter("mtnlg_prompt_tokens_total", "prompt tokens prefilled")
        self.generation_tokens = Counter("mtnlg_generation_tokens_total", "tokens generated")
        self.queue_depth = Gauge("mtnlg_queue_depth", "sequences waiting for a cache row")
        self.running = Gauge("mtnlg_running_sequences", "sequences holding a cache row")
        self.running_peak = Gauge("mtnlg_running_sequences_peak", "most sequences that held rows at once")
        self.ttft = Histogram("mtnlg_time_to_first_token_seconds", "from arrival to the first generated token")
        self.itl = Histogram("mtnlg_inter_token_latency_seconds", "between two tokens of one sequence")

    def render(self) -> str:
        lines: list[str] = []
        for m in (self.requests, self.prompt_tokens, self.generation_tokens, self.queue_depth, self.running,
                  self.running_peak,
                  self.ttft, self.itl):
            lines += m.render()
        return "\n".join(lines) + "\n"
