"""Fleet-wide aggregates: records a probe prints, merged over every host.

A probe prints aggregate records among its ordinary output (they stay in it too):

``@agg count NAME VALUE KEY``
    adds the whole number VALUE to KEY's total in the count aggregate NAME; KEY is the
    rest of the line (spaces allowed, may be empty). The fleet's totals are summed per
    key and sorted, largest first: the fleet's top N is their first N.
``@agg hist NAME``
    the lines that follow are a histogram exactly as ``print(@hist_log(x))`` or
    ``print(@hist_linear(x, ...))`` draws it, up to its closing blank line. Hosts'
    histograms are added bucket by bucket, whatever range each host printed.

NAME is 1 to 64 letters, digits or ``_.:-``. Every record adds: a probe prints its
aggregates once (in ``probe end``) or prints and deletes them every interval. A target
may be hostile: lines are checked, keys cut at 256 characters, and past the limits
below records are counted as rejected instead of growing the controller's memory.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from stapctl.models import (
    Aggregates,
    CountTotal,
    Event,
    HistogramBound,
    HistogramBucket,
    HistogramTotal,
)

MARKER = "@agg "
MAX_AGGREGATES = 64  # distinct (probe, name) aggregates in a run
MAX_KEYS = 10_000  # keys of one count aggregate over the fleet
MAX_KEY = 256  # characters of a key
MAX_BUCKETS = 512  # buckets of one histogram
MAX_VALUE = 2**62  # largest magnitude of one record's value or one bucket's count
HIST_WIDTH = 50  # stap's bar width (HIST_WIDTH in its runtime)
HIST_ELISION = 2  # stap's zero-row elision (HIST_ELISION in its runtime)

_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_COUNT = re.compile(r"count (?P<name>\S+) (?P<value>[+-]?[0-9]{1,20})(?: (?P<key>.*))?")
_HIST = re.compile(r"hist (?P<name>\S+)")
_HEADER = re.compile(r" *value \|-+ count")
_ROW = re.compile(r" *(?P<bound>[<>]?)(?P<value>-?[0-9]{1,20}) \|@* +(?P<count>[0-9]{1,20})")
_ELIDED = re.compile(r" *~")

Bucket = tuple[HistogramBound, int]
_BOUNDS: dict[str, HistogramBound] = {"<": "<", "": "", ">": ">"}
_BOUND_ORDER = {"<": 0, "": 1, ">": 2}


def _bucket_order(bucket: Bucket) -> tuple[int, int]:
    return _BOUND_ORDER[bucket[0]], bucket[1]


@dataclass
class _Reading:
    """A histogram being read from one host's output."""

    name: str
    header_seen: bool = False
    buckets: Counter[Bucket] = field(default_factory=Counter)


class Aggregator:
    """Reads the output events of a run, in order per host, and merges the records."""

    def __init__(self) -> None:
        self.rejected = 0
        self._counts: dict[tuple[str, str], Counter[str]] = {}
        self._histograms: dict[tuple[str, str], Counter[Bucket]] = {}
        self._hosts: defaultdict[tuple[str, str], set[str]] = defaultdict(set)
        self._reading: dict[tuple[str, str], _Reading] = {}  # (host, probe) → histogram

    def feed(self, event: Event) -> None:
        if event.kind != "output":
            return
        stream = (event.host, event.probe)
        reading = self._reading.get(stream)
        if reading is not None and self._read_histogram_line(stream, reading, event.text):
            return
        if event.text.startswith(MARKER):
            self._record(event.host, event.probe, event.text[len(MARKER):])

    def result(self) -> Aggregates:
        """The merged aggregates; a histogram still being read (no closing blank line) is
        taken as it is."""
        for stream, reading in list(self._reading.items()):
            self._close_histogram(stream, reading)
        counts = tuple(
            CountTotal(probe, name, tuple(sorted(self._hosts[(probe, name)])),
                       tuple(sorted(totals.items(), key=lambda item: (-item[1], item[0]))))
            for (probe, name), totals in sorted(self._counts.items()))
        histograms = tuple(
            _histogram_total(probe, name, tuple(sorted(self._hosts[(probe, name)])), buckets)
            for (probe, name), buckets in sorted(self._histograms.items()))
        return Aggregates(counts, histograms, self.rejected)

    # -- records -------------------------------------------------------------------------
    def _record(self, host: str, probe: str, text: str) -> None:
        if (count := _COUNT.fullmatch(text)) and _NAME.fullmatch(count["name"]):
            self._add_count(host, probe, count["name"], int(count["value"]),
                            count["key"] or "")
        elif (hist := _HIST.fullmatch(text)) and _NAME.fullmatch(hist["name"]):
            self._reading[(host, probe)] = _Reading(hist["name"])
        else:
            self.rejected += 1

    def _room_for(self, aggregate: tuple[str, str]) -> bool:
        known = aggregate in self._counts or aggregate in self._histograms
        return known or len(self._counts) + len(self._histograms) < MAX_AGGREGATES

    def _add_count(self, host: str, probe: str, name: str, value: int, key: str) -> None:
        aggregate = (probe, name)
        if (abs(value) > MAX_VALUE or len(key) > MAX_KEY or aggregate in self._histograms
                or not self._room_for(aggregate)):
            self.rejected += 1
            return
        totals = self._counts.setdefault(aggregate, Counter())
        if key not in totals and len(totals) >= MAX_KEYS:
            self.rejected += 1
            return
        totals[key] += value
        self._hosts[aggregate].add(host)

    # -- histograms ----------------------------------------------------------------------
    def _read_histogram_line(self, stream: tuple[str, str], reading: _Reading,
                             text: str) -> bool:
        """Take one line into the histogram being read; False if the line is not part of
        it (the histogram is closed, and the line is read as any other)."""
        if not reading.header_seen:
            if _HEADER.fullmatch(text):
                reading.header_seen = True
                return True
            del self._reading[stream]
            self.rejected += 1  # a marker with no histogram after it
            return False
        if (row := _ROW.fullmatch(text)) is not None:
            count = int(row["count"])
            bucket: Bucket = (_BOUNDS[row["bound"]], int(row["value"]))
            if count > MAX_VALUE or (bucket not in reading.buckets
                                     and len(reading.buckets) >= MAX_BUCKETS):
                del self._reading[stream]
                self.rejected += 1
                return True
            reading.buckets[bucket] += count
            return True
        if _ELIDED.fullmatch(text):
            return True
        self._close_histogram(stream, reading)
        return text == ""  # the blank line that ends stap's drawing belongs to it

    def _close_histogram(self, stream: tuple[str, str], reading: _Reading) -> None:
        del self._reading[stream]
        host, probe = stream
        aggregate = (probe, reading.name)
        merged = self._histograms.get(aggregate)
        if merged is None:
            if aggregate in self._counts or not self._room_for(aggregate):
                self.rejected += 1
                return
            merged = self._histograms[aggregate] = Counter()
        if len(set(merged) | set(reading.buckets)) > MAX_BUCKETS:
            self.rejected += 1
            return
        merged.update(reading.buckets)
        self._hosts[aggregate].add(host)


def _histogram_total(probe: str, name: str, hosts: tuple[str, ...],
                     buckets: Counter[Bucket]) -> HistogramTotal:
    kind: Literal["log", "linear"] = "log" if _looks_logarithmic(buckets) else "linear"
    ordered = sorted(buckets, key=_bucket_order)
    return HistogramTotal(probe, name, hosts, kind,
                          tuple(HistogramBucket(b, v, buckets[(b, v)]) for b, v in ordered))


def _looks_logarithmic(buckets: Iterable[Bucket]) -> bool:
    """No under- or overflow bucket, and every bucket 0 or a power of two (negated or
    not): what @hist_log prints."""
    return all(bound == "" and (value == 0 or abs(value) & (abs(value) - 1) == 0)
               for bound, value in buckets)


# -- drawing, as stap draws -----------------------------------------------------------------
def draw_histogram(histogram: HistogramTotal) -> list[str]:
    """The histogram as stap's runtime draws it (_stp_stat_print_histogram_buf): the buckets
    between the hosts' ones filled with zeros, runs of zero rows elided with a ``~``."""
    rows = _all_rows(histogram)
    if not rows:
        return []
    counts = [count for _, _, count in rows]
    valmax = max(counts)
    scale = 1 if valmax <= HIST_WIDTH else math.ceil(valmax / HIST_WIDTH)
    labels = [f"{bound}{value}" for bound, value, _ in rows]
    val_space = max(5, *(len(label) for label in labels))
    cnt_space = len(str(valmax))
    lines = [f"{'value':>{val_space}} |" + "-" * HIST_WIDTH + " count"]
    eliding = False
    for index, (label, count) in enumerate(zip(labels, counts, strict=True)):
        near = counts[max(0, index - HIST_ELISION): index + HIST_ELISION + 1]
        if not any(near):
            eliding = True
            continue
        if eliding:
            lines.append(" " * val_space + " ~")
            eliding = False
        bar = count // scale
        lines.append(f"{label:>{val_space}} |" + "@" * bar
                     + f"{count:>{HIST_WIDTH - bar + 1 + cnt_space}}")
    return lines


def _all_rows(histogram: HistogramTotal) -> list[tuple[HistogramBound, int, int]]:
    """Every row from the first bucket to the last: the buckets no host printed (stap
    elided them, or they are outside its range) are zero."""
    plain = {b.value: b.count for b in histogram.buckets if b.bound == ""}
    values = sorted(plain)
    filled: list[int] = values
    if len(values) > 1:
        if histogram.kind == "log":
            filled = [values[0]]
            while filled[-1] < values[-1]:
                filled.append(_next_log_bucket(filled[-1]))
        else:
            step = math.gcd(*(b - a for a, b in zip(values, values[1:], strict=False)))
            if (values[-1] - values[0]) // step <= MAX_BUCKETS:
                filled = list(range(values[0], values[-1] + 1, step))
    under = [(b.bound, b.value, b.count) for b in histogram.buckets if b.bound == "<"]
    over = [(b.bound, b.value, b.count) for b in histogram.buckets if b.bound == ">"]
    middle: list[tuple[HistogramBound, int, int]] = [("", v, plain.get(v, 0)) for v in filled]
    return under + middle + over


def _next_log_bucket(value: int) -> int:
    """The bucket after ``value`` in @hist_log's order: …, -4, -2, -1, 0, 1, 2, 4, …"""
    if value < -1:
        return value // 2
    if value in (-1, 0):
        return value + 1
    return value * 2


def aggregates_json(aggregates: Aggregates) -> dict[str, Any]:
    """The aggregates as plain JSON data (aggregates.json, --format json, sinks)."""
    return {
        "counts": [{"probe": c.probe, "name": c.name, "hosts": list(c.hosts),
                    "totals": [{"key": key, "value": value} for key, value in c.totals]}
                   for c in aggregates.counts],
        "histograms": [{"probe": h.probe, "name": h.name, "hosts": list(h.hosts),
                        "kind": h.kind,
                        "buckets": [{"bound": b.bound, "value": b.value, "count": b.count}
                                    for b in h.buckets]}
                       for h in aggregates.histograms],
        "rejected": aggregates.rejected,
    }
