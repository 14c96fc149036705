"""The engine's pure parts: its URL, its signatures, its slices."""

from __future__ import annotations

import base64
import pickle
from pathlib import Path

import pytest

from stapctl.agent import checked_facts
from stapctl.engine import CeleryEngine, Refused, SliceWork, broker_url, seal, split, unseal
from stapctl.errors import BadFactsError, UsageError
from stapctl.execute import Fleet, RunOptions
from stapctl.models import Event, FailureKind, Host, HostFacts, Manifest, Probe

pytestmark = pytest.mark.unit
SECRET = b"s3cret"


def work(issued: float | None = None) -> SliceWork:
    manifest = Manifest(path=Path("m.yaml"), name="m", probes=())
    made = SliceWork(run_id="r", slice_id="1", manifest=manifest, options=RunOptions(),
                     hosts=(Host(name="a", address="127.0.0.1"),), order=("a",))
    return made if issued is None else SliceWork(**{**made.__dict__, "issued": issued})


def test_the_engine_url_names_a_redis_broker() -> None:
    assert broker_url("celery+redis://10.0.0.5:6379/2") == "redis://10.0.0.5:6379/2"
    for wrong in ("redis://h:6379/0", "celery+redis://:6379/0", "celery+redis://h:port/0",
                  "celery+redis://h:6379/db"):
        with pytest.raises(UsageError, match="celery\\+redis://HOST:PORT/DB|port"):
            broker_url(wrong)


def test_a_sealed_slice_opens_only_with_its_secret_and_unchanged() -> None:
    sealed = work()
    payload, signed = seal(SECRET, sealed)
    assert unseal(SECRET, payload, signed) == sealed
    with pytest.raises(Refused):
        unseal(b"another", payload, signed)
    data = bytearray(base64.b64decode(payload))
    data[-2] ^= 1
    with pytest.raises(Refused):
        unseal(SECRET, base64.b64encode(bytes(data)).decode(), signed)
    with pytest.raises(Refused):
        unseal(SECRET, payload, None)


def test_nothing_is_unpickled_before_the_signature_checks() -> None:
    class Boom:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (pytest.fail, ("unpickled an unsigned payload",))

    payload = base64.b64encode(pickle.dumps(Boom())).decode()
    with pytest.raises(Refused):
        unseal(SECRET, payload, "0" * 64)


def test_a_stale_task_is_refused() -> None:
    payload, signed = seal(SECRET, work(issued=0.0))
    with pytest.raises(Refused, match="more than a day"):
        unseal(SECRET, payload, signed)


def test_hosts_are_split_in_order_into_slices_of_near_equal_size() -> None:
    names = [f"h{i}" for i in range(10)]
    assert list(split(names, 3)) == [names[:4], names[4:7], names[7:]]
    assert list(split(names, 50)) == [[name] for name in names]
    assert list(split([], 3)) == []


def test_a_worker_s_report_of_facts_is_checked_as_a_target_s_own() -> None:
    """No broker is contacted: the facts messages are applied as the pump applies them."""
    manifest = Manifest(path=Path("m.yaml"), name="m", probes=(
        Probe(name="p", template="", origin="m.yaml", first_line=1),))
    events: list[Event] = []
    fleet = Fleet(manifest, RunOptions(), events.append, run_name="r")
    dispatch = CeleryEngine("redis://127.0.0.1:1/0", SECRET).begin(fleet, lambda text: None)
    dispatch.hosts = {name: Host(name=name, address="10.0.0.1") for name in ("good", "bad")}
    dispatch._apply({"t": "facts", "host": "good", "release": "6.1.0-9-amd64",
                     "arch": "x86_64", "execution": "e1"})
    dispatch._apply({"t": "facts", "host": "bad", "release": "../../x", "arch": "x86_64",
                     "execution": "e1"})
    with pytest.raises(ValueError, match="not in this run"):
        dispatch._apply({"t": "facts", "host": "stranger", "release": "6.1",
                         "arch": "x86_64", "execution": "e1"})

    assert dispatch.facts == {"good": HostFacts(release="6.1.0-9-amd64", arch="x86_64")}
    assert [(e.host, e.kind, e.text) for e in events if e.kind == "connected"] == [
        ("good", "connected", "6.1.0-9-amd64 x86_64")]
    (outcome,) = fleet.outcomes
    with pytest.raises(BadFactsError) as own:
        checked_facts("../../x", "x86_64")
    assert (outcome.host, outcome.status, outcome.kind, outcome.message) == (
        "bad", "failed", FailureKind.BAD_FACTS, str(own.value))
