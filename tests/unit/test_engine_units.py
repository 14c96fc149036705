"""The engine's pure parts: its URL, its signatures, its slices."""

from __future__ import annotations

import base64
import pickle
from pathlib import Path

import pytest

from stapctl.engine import Refused, SliceWork, broker_url, seal, split, unseal
from stapctl.errors import UsageError
from stapctl.execute import RunOptions
from stapctl.models import Host, Manifest

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
