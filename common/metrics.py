"""Prometheus text exposition (format 0.0.4) without a dependency: counters, gauges and histograms
with labels, rendered by `Metrics.render()`. Torch-free; every name gets the `tandem_` prefix."""

from __future__ import annotations

import bisect
import math

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(v) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = "tandem_" + name, help, labels
        self.values: dict[tuple, object] = {}

    def _items(self):
        """Values by label set; an unlabelled metric shows its zero before the first observation."""
        if not self.values and not self.label_names:
            return [((), self._zero())]
        return list(self.values.items())

    def _zero(self):
        return 0.0

    def _key(self, labels: dict | None) -> tuple:
        labels = labels or {}
        return tuple(str(labels.get(n, "")) for n in self.label_names)


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name, help, labels=()):
        super().__init__(name if name.endswith("_total") else name + "_total", help, labels)

    def inc(self, amount: float = 1.0, **labels) -> None:
        k = self._key(labels)
        self.values[k] = self.values.get(k, 0.0) + amount

    def get(self, **labels) -> float:
        return self.values.get(self._key(labels), 0.0)

    def lines(self):
        for k, v in self._items():
            yield f"{self.name}{_labels(self.label_names, k)} {_num(v)}"


class Gauge(_Metric):
    kind = "gauge"

    def set(self, value: float, **labels) -> None:
        self.values[self._key(labels)] = value

    def inc(self, amount: float = 1.0, **labels) -> None:
        k = self._key(labels)
        self.values[k] = self.values.get(k, 0.0) + amount

    def dec(self, amount: float = 1.0, **labels) -> None:
        self.inc(-amount, **labels)

    def get(self, **labels) -> float:
        return self.values.get(self._key(labels), 0.0)

    def lines(self):
        for k, v in self._items():
            yield f"{self.name}{_labels(self.label_names, k)} {_num(v)}"


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name, help, labels=(), buckets=LATENCY_BUCKETS):
        super().__init__(name, help, labels)
        self.buckets = tuple(sorted(buckets))

    def _zero(self):
        return [[0] * (len(self.buckets) + 1), 0.0, 0]

    def observe(self, value: float, **labels) -> None:
        k = self._key(labels)
        h = self.values.get(k)
        if h is None:
            h = self.values[k] = [[0] * (len(self.buckets) + 1), 0.0, 0]
        h[0][bisect.bisect_left(self.buckets, value)] += 1
        h[1] += value
        h[2] += 1

    def count(self, **labels) -> int:
        h = self.values.get(self._key(labels))
        return h[2] if h else 0

    def lines(self):
        for k, (counts, total, n) in self._items():
            acc = 0
            for b, c in zip(self.buckets, counts):
                acc += c
                le = 'le="' + _num(b) + '"'
                yield f"{self.name}_bucket{_labels(self.label_names, k, le)} {acc}"
            inf = 'le="+Inf"'
            yield f"{self.name}_bucket{_labels(self.label_names, k, inf)} {n}"
            yield f"{self.name}_sum{_labels(self.label_names, k)} {_num(total)}"
            yield f"{self.name}_count{_labels(self.label_names, k)} {n}"


class Metrics:
    def __init__(self):
        self._all: list[_Metric] = []

    def _add(self, m):
        self._all.append(m)
        return m

    def counter(self, name, help, labels=()) -> Counter:
        return self._add(Counter(name, help, tuple(labels)))

    def gauge(self, name, help, labels=()) -> Gauge:
        return self._add(Gauge(name, help, tuple(labels)))

    def histogram(self, name, help, labels=(), buckets=LATENCY_BUCKETS) -> Histogram:
        return self._add(Histogram(name, help, tuple(labels), buckets))

    def render(self) -> str:
        out = []
        for m in self._all:
            out.append(f"# HELP {m.name} {m.help}")
            out.append(f"# TYPE {m.name} {m.kind}")
            out.extend(m.lines())
        return "\n".join(out) + "\n"


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
