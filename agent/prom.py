"""Prometheus' text exposition (format 0.0.4) for the mesh's processes: the metric families a
collector builds when it is scraped, their text, and one text made of two (the tunnel's 15020
serves its own families and the agent's).

Written here rather than taken from prometheus_client: importing its exposition imports
http.server, urllib.request and email, 4.5 MiB of resident memory in each of the agent, the
tunnel and a waypoint's supervisor (measured on top of what they import anyway), for the few
lines below. The text is the same as prometheus_client's, byte for byte, and so is what the
parser reads (tests/unit/test_prom.py compares both with prometheus_client's own).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from typing import NamedTuple

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


class Sample(NamedTuple):
    name: str
    labels: dict
    value: float


class Family:
    """One metric family and its samples. A counter's name is without ``_total`` (its samples
    and the text's # HELP and # TYPE lines have it), as in prometheus_client."""

    def __init__(self, name: str, documentation: str, kind: str, labels: Iterable[str] = ()):
        if not _NAME.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        self.name, self.documentation, self.type = name, documentation, kind
        self.labelnames = tuple(labels)
        self.samples: list[Sample] = []

    def _sample(self, name: str, labels: Iterable[str], value: float, extra=()) -> None:
        self.samples.append(
            Sample(name, dict([*zip(self.labelnames, labels, strict=False), *extra]), value)
        )


class CounterMetricFamily(Family):
    """A counter: ``name_total`` (a name given with ``_total`` is the same counter)."""

    def __init__(self, name: str, documentation: str, value=None, labels=None):
        super().__init__(name.removesuffix("_total"), documentation, "counter", labels or ())
        if value is not None:
            self.add_metric([], value)

    def add_metric(self, labels: Iterable[str], value: float) -> None:
        self._sample(self.name + "_total", labels, value)


class GaugeMetricFamily(Family):
    def __init__(self, name: str, documentation: str, value=None, labels=None):
        super().__init__(name, documentation, "gauge", labels or ())
        if value is not None:
            self.add_metric([], value)

    def add_metric(self, labels: Iterable[str], value: float) -> None:
        self._sample(self.name, labels, value)


class HistogramMetricFamily(Family):
    def __init__(self, name: str, documentation: str, labels=None):
        super().__init__(name, documentation, "histogram", labels or ())

    def add_metric(self, labels, buckets: list[tuple[str, float]], sum_value: float) -> None:
        """buckets: (upper bound as text, cumulative count), sorted, ending with "+Inf"."""
        labels = list(labels)
        for le, count in buckets:
            self._sample(self.name + "_bucket", labels, count, (("le", le),))
        self._sample(self.name + "_count", labels, buckets[-1][1])
        self._sample(self.name + "_sum", labels, sum_value)


class Registry:
    """Collectors (objects with ``collect()`` yielding families), asked at every scrape."""

    def __init__(self, *collectors):
        self.collectors = list(collectors)

    def register(self, collector) -> None:
        self.collectors.append(collector)

    def collect(self) -> Iterator[Family]:
        for c in self.collectors:
            yield from c.collect()

    def text(self) -> str:
        return render(self.collect())


def number(v: float) -> str:
    """A value as Go (and so Prometheus) writes it."""
    d = float(v)
    if math.isinf(d):
        return "+Inf" if d > 0 else "-Inf"
    if math.isnan(d):
        return "NaN"
    s = repr(d)
    dot = s.find(".")
    if d > 0 and dot > 6:  # Go writes an exponent sooner than Python
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+0{dot - 1}"
    return s


def _escape(v: str) -> str:
    return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def render(families: Iterable[Family]) -> str:
    out: list[str] = []
    for f in families:
        doc = f.documentation.replace("\\", r"\\").replace("\n", r"\n")
        name = f.name + "_total" if f.type == "counter" else f.name
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {f.type}\n")
        for s in f.samples:
            if s.labels:
                inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(s.labels.items()))
                out.append(f"{s.name}{{{inner}}} {number(s.value)}\n")
            else:
                out.append(f"{s.name} {number(s.value)}\n")
    return "".join(out)


# ---- reading a text (the agent's, which the tunnel serves with its own) ----------------------
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+-?\d+)?\s*$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def _labels(text: str, line: str) -> dict:
    out, pos = {}, 0
    while pos < len(text):
        m = _LABEL.match(text, pos)
        if m is None:
            raise ValueError(f"bad labels in metric line {line!r}")
        out[m.group(1)] = re.sub(r"\\[\\\"n]", lambda e: _UNESCAPE[e.group(0)], m.group(2))
        pos = m.end()
    return out


def parse(text: str) -> list[Family]:
    """The families of a 0.0.4 text, as render() writes them (samples without a # TYPE line
    before them are families of their own, untyped). A malformed line raises ValueError."""
    fams: dict[str, Family] = {}
    docs: dict[str, str] = {}
    current: Family | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] == "HELP":
                docs[parts[2]] = (parts[3] if len(parts) > 3 else "").replace(
                    r"\n", "\n").replace(r"\\", "\\")  # fmt: skip
            elif len(parts) >= 4 and parts[1] == "TYPE":
                kind = parts[3].strip()
                name = parts[2].removesuffix("_total") if kind == "counter" else parts[2]
                current = fams.get(name)
                if current is None:
                    current = fams[name] = Family(name, docs.get(parts[2], ""), kind)
            continue
        m = _SAMPLE.match(line)
        if m is None:
            raise ValueError(f"bad metric line {line!r}")
        try:
            value = float(m.group(3))
        except ValueError:
            raise ValueError(f"bad value in metric line {line!r}") from None
        name, labels = m.group(1), _labels(m.group(2) or "", line)
        if current is None or not _belongs(name, current):
            current = fams.get(name) or fams.setdefault(name, Family(name, "", "untyped"))
        current.samples.append(Sample(name, labels, value))
    return list(fams.values())


def _belongs(sample: str, f: Family) -> bool:
    if f.type == "histogram":
        return sample in (f.name + "_bucket", f.name + "_count", f.name + "_sum")
    return sample == (f.name + "_total" if f.type == "counter" else f.name)


def merge(*texts: str) -> str:
    """Texts as one: a family in several (istio_tcp_connections_opened: the tunnel's flows and
    the agent's direct ones) is one family whose samples are the sums of each text's.
    Prometheus refuses a family given twice in one scrape."""
    fams: dict[str, Family] = {}
    for text in texts:
        for fam in parse(text):
            have = fams.get(fam.name)
            if have is None:
                fams[fam.name] = fam
                continue
            at = {(s.name, tuple(sorted(s.labels.items()))): i for i, s in enumerate(have.samples)}
            for s in fam.samples:
                i = at.get((s.name, tuple(sorted(s.labels.items()))))
                if i is None:
                    have.samples.append(s)
                else:
                    have.samples[i] = have.samples[i]._replace(
                        value=have.samples[i].value + s.value
                    )
    return render(fams.values())
