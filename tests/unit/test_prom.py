"""agent/prom.py: the mesh's Prometheus text is prometheus_client's, byte for byte, and what it
reads back is what prometheus_client's parser reads (prometheus_client is the reference here;
the mesh's processes no longer import it: 4.5 MiB each)."""

import math

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import core as pc
from prometheus_client.parser import text_string_to_metric_families

from agent import prom

ODD = ["back\\slash", 'quote"d', "new\nline", "ünï", "", "a,b=c}", '{x="y"}']
VALUES = [0, 1, 7.5, -3, 1e-9, 123456.0, 1234567.0, 98765432.1, 2**53, math.inf, -math.inf]


def _families(mod):
    """The same families, built with prometheus_client's classes or ours."""
    out = []
    c = mod.CounterMetricFamily("dabba_things_total", "Things, by kind\\counted\nhere",
                                labels=["kind", "zone"])  # fmt: skip
    for i, v in enumerate(ODD):
        c.add_metric([v, f"z{i}"], VALUES[i % len(VALUES)])
    out.append(c)
    out.append(mod.CounterMetricFamily("dabba_plain", "Without _total", 42))
    g = mod.GaugeMetricFamily("dabba_level", "Levels", labels=["map"])
    for i, v in enumerate(VALUES):
        g.add_metric([f"m{i}"], v)
    out.append(g)
    out.append(mod.GaugeMetricFamily("dabba_up", "Up", 1))
    h = mod.HistogramMetricFamily("dabba_rtt_seconds", "RTT", labels=["dst"])
    h.add_metric(["a"], [("0.001", 1), ("0.01", 4), ("+Inf", 9)], 0.25)
    h.add_metric(['q"'], [("0.001", 0), ("0.01", 0), ("+Inf", 0)], 0)
    out.append(h)
    return out


def test_the_text_is_prometheus_clients_byte_for_byte():
    class _C:
        def collect(self):
            return _families(pc)

    reg = CollectorRegistry(auto_describe=False)
    reg.register(_C())
    ours = prom.Registry(type("C", (), {"collect": lambda self: _families(prom)})()).text()
    assert ours == generate_latest(reg).decode()
    # and a collector's families read the same (names, types, samples)
    assert [(f.name, f.type, f.samples) for f in _families(prom)] == [
        (f.name, f.type, [(s.name, s.labels, s.value) for s in f.samples]) for f in _families(pc)
    ]


def test_numbers_are_written_as_go_writes_them():
    assert [prom.number(v) for v in (1, 0.5, 1234567.0, math.inf, -math.inf, math.nan)] == [
        "1.0", "0.5", "1.234567e+06", "+Inf", "-Inf", "NaN"]  # fmt: skip


def _samples_reference(text):
    return sorted((s.name, tuple(sorted(s.labels.items())), s.value if not math.isnan(s.value)
                   else "nan") for f in text_string_to_metric_families(text)
                  for s in f.samples)  # fmt: skip


def _samples_ours(fams):
    return sorted((s.name, tuple(sorted(s.labels.items())), s.value if not math.isnan(s.value)
                   else "nan") for f in fams for s in f.samples)  # fmt: skip


def test_what_it_reads_is_what_prometheus_clients_parser_reads():
    text = prom.render(_families(prom))
    fams = prom.parse(text)
    assert _samples_ours(fams) == _samples_reference(text)
    assert [(f.name, f.type, f.documentation) for f in fams] == [
        ("dabba_things", "counter", "Things, by kind\\counted\nhere"),
        ("dabba_plain", "counter", "Without _total"),
        ("dabba_level", "gauge", "Levels"), ("dabba_up", "gauge", "Up"),
        ("dabba_rtt_seconds", "histogram", "RTT")]  # fmt: skip
    assert prom.render(fams) == text  # and writes it back unchanged


def test_merge_sums_a_family_both_texts_give_and_keeps_the_others():
    a = prom.CounterMetricFamily("x", "X", labels=["k"])
    a.add_metric(["one"], 2)
    a.add_metric(["two"], 5)
    b = prom.CounterMetricFamily("x", "X", labels=["k"])
    b.add_metric(["two"], 7)
    b.add_metric(["three"], 1)
    text = prom.merge(prom.render([a, prom.GaugeMetricFamily("only_a", "A", 3)]),
                      prom.render([b, prom.GaugeMetricFamily("only_b", "B", 4)]))  # fmt: skip
    got = {(f.name, s.labels.get("k")): s.value for f in prom.parse(text) for s in f.samples}
    assert got == {("x", "one"): 2, ("x", "two"): 12, ("x", "three"): 1,
                   ("only_a", None): 3, ("only_b", None): 4}  # fmt: skip
    assert text.count("# TYPE x_total counter") == 1


@pytest.mark.parametrize("line", ['x{k="v} 1', "x{k=v} 1", "x 1 2 3", 'x{k="v"} one', "9x 1"])
def test_a_malformed_line_is_refused_naming_it(line):
    with pytest.raises(ValueError, match="metric line"):
        prom.parse(f"# TYPE x gauge\n{line}\n")


def test_an_invalid_name_is_refused():
    with pytest.raises(ValueError, match="invalid metric name"):
        prom.GaugeMetricFamily("dabba-up", "no dashes")
