"""Fleet-wide aggregates: records merged over hosts, checked against sums done by hand;
histograms drawn as stap draws them (the fixtures are real stap output from a lab guest)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stapctl import aggregate
from stapctl.aggregate import Aggregator, draw_histogram
from stapctl.models import Aggregates, Event, HistogramBucket
from stapctl.report import aggregate_lines

pytestmark = pytest.mark.unit
DATA = Path(__file__).parent / "data"


def feed(lines_by_host: dict[str, list[str]], probe: str = "p") -> Aggregates:
    """Feed each host's lines, interleaved line by line as a fleet's events arrive."""
    aggregator = Aggregator()
    streams = {host: iter(lines) for host, lines in lines_by_host.items()}
    while streams:
        for host, lines in list(streams.items()):
            line = next(lines, None)
            if line is None:
                del streams[host]
            else:
                aggregator.feed(Event(host=host, kind="output", probe=probe, text=line))
    return aggregator.result()


def hist_log(rows: list[tuple[int, int]]) -> list[str]:
    """Rows drawn as stap's @hist_log draws them (widths for small numbers)."""
    width = max(5, *(len(str(value)) for value, _ in rows))
    top = max(count for _, count in rows)
    return [f"{'value':>{width}} |" + "-" * 50 + " count",
            *(f"{value:>{width}} |" + "@" * count + f"{count:>{50 - count + 1 + len(str(top))}}"
              for value, count in rows), ""]


def buckets(histogram_buckets: tuple[HistogramBucket, ...]) -> dict[str, int]:
    return {f"{b.bound}{b.value}": b.count for b in histogram_buckets}


def test_counts_are_summed_per_key_over_the_hosts_largest_first() -> None:
    result = feed({
        "a": ["@agg count calls 5 bash", "ordinary output", "@agg count calls 3 sshd"],
        "b": ["@agg count calls 7 bash", "@agg count calls 1 cron job"],
        "c": ["@agg count calls 2 sshd", "@agg count calls 4 bash"],
    })
    [calls] = result.counts
    assert (calls.probe, calls.name, calls.hosts) == ("p", "calls", ("a", "b", "c"))
    assert calls.totals == (("bash", 16), ("sshd", 5), ("cron job", 1))
    assert result.rejected == 0


def test_histograms_with_different_ranges_are_added_bucket_by_bucket() -> None:
    result = feed({
        "a": ["@agg hist lat", *hist_log([(4, 0), (8, 3), (16, 5), (32, 0), (64, 2),
                                          (128, 0), (256, 0)])],
        "b": ["@agg hist lat", *hist_log([(16, 0), (32, 0), (64, 4), (128, 1), (256, 0),
                                          (512, 0)])],
        "c": ["@agg hist lat", *hist_log([(256, 0), (512, 0), (1024, 6), (2048, 0),
                                          (4096, 0)]), "after the histogram"],
    })
    [lat] = result.histograms
    assert lat.kind == "log" and lat.hosts == ("a", "b", "c")
    # by hand: 8: 3; 16: 5; 64: 2+4; 128: 0+1; 1024: 6; the rest 0
    assert {k: v for k, v in buckets(lat.buckets).items() if v} == \
        {"8": 3, "16": 5, "64": 6, "128": 1, "1024": 6}
    assert draw_histogram(lat) == [
        "value |-------------------------------------------------- count",
        "    4 |                                                   0",
        "    8 |@@@                                                3",
        "   16 |@@@@@                                              5",
        "   32 |                                                   0",
        "   64 |@@@@@@                                             6",
        "  128 |@                                                  1",
        "  256 |                                                   0",
        "  512 |                                                   0",
        " 1024 |@@@@@@                                             6",
        " 2048 |                                                   0",
        " 4096 |                                                   0",
    ]


def test_a_long_run_of_zero_buckets_is_elided_as_stap_does() -> None:
    result = feed({"a": ["@agg hist lat", *hist_log([(1, 0), (2, 1), (4, 0), (8, 0)])],
                   "b": ["@agg hist lat", *hist_log([(256, 0), (512, 0), (1024, 2),
                                                     (2048, 0), (4096, 0)])]})
    assert draw_histogram(result.histograms[0]) == [
        "value |-------------------------------------------------- count",
        "    1 |                                                   0",
        "    2 |@                                                  1",
        "    4 |                                                   0",
        "    8 |                                                   0",
        "      ~",
        "  256 |                                                   0",
        "  512 |                                                   0",
        " 1024 |@@                                                 2",
        " 2048 |                                                   0",
        " 4096 |                                                   0",
    ]


def stap_histograms(path: Path) -> list[list[str]]:
    """The histograms in a host's real output: the lines after each `@agg hist`."""
    found: list[list[str]] = []
    lines = path.read_text().splitlines()
    for index, line in enumerate(lines):
        if line.startswith("@agg hist "):
            end = lines.index("", index)
            found.append(lines[index + 1:end])
    return found


@pytest.mark.parametrize("fixture", ["agg-fleet-syscalls.txt", "agg-hist-linear.txt"])
def test_one_host_s_histograms_are_drawn_back_exactly_as_stap_drew_them(
        fixture: str) -> None:
    drawn = stap_histograms(DATA / fixture)
    result = feed({"a": (DATA / fixture).read_text().splitlines()})
    assert [draw_histogram(h) for h in result.histograms] == \
        [drawn[i] for i in _order_by_name(DATA / fixture)]


def _order_by_name(path: Path) -> list[int]:
    names = [line.split()[2] for line in path.read_text().splitlines()
             if line.startswith("@agg hist ")]
    return sorted(range(len(names)), key=lambda i: names[i])


def test_linear_histograms_keep_their_under_and_overflow_buckets() -> None:
    host_a = ["@agg hist sizes",
              "value |-------------------------------------------------- count",
              "  <0 |@@                                                 2",
              "   0 |@                                                  1",
              "  10 |                                                   0",
              "  20 |@@@                                                3",
              "  30 |                                                   0",
              "  40 |                                                   0",
              ""]
    host_b = ["@agg hist sizes",
              "value |-------------------------------------------------- count",
              "  70 |                                                   0",
              "  80 |                                                   0",
              "  90 |@@@@                                               4",
              "  >100 |@                                                1",
              ""]
    [sizes] = feed({"a": host_a, "b": host_b}).histograms
    assert sizes.kind == "linear"
    assert buckets(sizes.buckets) == {"<0": 2, "0": 1, "10": 0, "20": 3, "30": 0, "40": 0,
                                      "70": 0, "80": 0, "90": 4, ">100": 1}
    drawn = draw_histogram(sizes)
    # 50 and 60 were printed by no host: zeros, elided with 40 and 70 between them
    assert [line.split("|")[0].strip() for line in drawn] == \
        ["value", "<0", "0", "10", "20", "30", "40", "~", "70", "80", "90", ">100"]


def test_a_host_s_records_in_two_probes_stay_apart() -> None:
    aggregator = Aggregator()
    for probe, value in (("one", 2), ("two", 5), ("one", 3)):
        aggregator.feed(Event("h", "output", probe, f"@agg count n {value} k"))
    result = aggregator.result()
    assert [(c.probe, c.totals) for c in result.counts] == \
        [("one", (("k", 5),)), ("two", (("k", 5),))]


def test_malformed_records_are_rejected_and_counted() -> None:
    result = feed({"a": [
        "@agg count calls many bash",  # not a number
        "@agg count bad/name 1 k",  # not a name
        "@agg count calls 1 " + "k" * (aggregate.MAX_KEY + 1),  # key too long
        f"@agg count calls {aggregate.MAX_VALUE + 1} k",  # too large
        "@agg sum calls 1 k",  # no such record
        "@agg hist lat", "not a histogram",  # a marker with nothing after it
        "@agg count calls 1 ok",
    ]})
    assert result.rejected == 6
    assert result.counts[0].totals == (("ok", 1),)


def test_the_number_of_keys_and_aggregates_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aggregate, "MAX_KEYS", 3)
    monkeypatch.setattr(aggregate, "MAX_AGGREGATES", 2)
    result = feed({"a": [f"@agg count one 1 k{i}" for i in range(5)]
                   + ["@agg count two 1 k", "@agg count three 1 k", "@agg count one 1 k0"]})
    assert [(c.name, len(c.totals)) for c in result.counts] == [("one", 3), ("two", 1)]
    assert dict(result.counts[0].totals)["k0"] == 2
    assert result.rejected == 3


def test_a_histogram_without_its_closing_line_is_taken_at_the_end() -> None:
    result = feed({"a": ["@agg hist lat", *hist_log([(1, 2), (2, 1)])[:-1]]})
    assert buckets(result.histograms[0].buckets) == {"1": 2, "2": 1}


def test_after_a_run_counts_show_the_fleet_s_top_keys_and_histograms_as_stap_draws() -> None:
    result = feed({
        "a": [f"@agg count calls {n} prog{n:02}" for n in range(1, 13)]
             + ["@agg count calls 100 evil\x1b[2J", "@agg hist lat", *hist_log([(1, 1)])],
        "b": ["@agg count calls 20 prog01", "@agg hist lat", *hist_log([(2, 3)])],
    })
    lines = aggregate_lines(result, top=3)
    assert lines[:4] == ["calls [p], 2 host(s): top 3 of 13",
                         "  100  evil\\x1b[2J",  # a target's key is escaped
                         "   21  prog01",
                         "   12  prog12"]
    start = lines.index("lat [p], 2 host(s)")
    assert lines[start + 1:start + 4] == [
        "value |-------------------------------------------------- count",
        "    1 |@                                                  1",
        "    2 |@@@                                                3",
    ]
