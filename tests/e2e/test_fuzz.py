"""Hostile input on the requests queue: thousands of malformed or hostile messages,
generated with hypothesis and mixed with valid requests, through the real dispatcher and
workers. Every bad message is dead-lettered with a reason, every valid one completes, and the
dispatcher is the same, live process at the end.

The stack is expensive, so hypothesis generates one big batch (its generate phase only) which
is then published at once; the examples are not run one by one against the processes.

The batch comes from one seed, printed with the result: ``RUNDISPATCH_FUZZ_SEED=<seed>``
generates the same batch again. When the test fails, every message it published is saved
whole (body, routing key, properties, kind) to ``.fuzz-failures/<seed>.jsonl``, the ones that
went wrong flagged, so a failure can be replayed and read.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import string
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from hypothesis import HealthCheck, Phase, given, seed
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from dispatcher.client import Client
from dispatcher.core.principals import admin_user_of
from dispatcher.models import RunStatus
from dispatcher.names import Names
from dispatcher.settings import Settings
from tests.support.builders import (
    fleet_document,
)
from tests.support.constants import OWNER
from tests.support.processes import (
    Processes,
    new_settings,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

MESSAGES = 2000
FAILURES = Path(__file__).resolve().parents[2] / ".fuzz-failures"


def fuzz_seed() -> int:
    """``RUNDISPATCH_FUZZ_SEED`` (to replay a batch), or a fresh one."""
    raw = os.environ.get("RUNDISPATCH_FUZZ_SEED")
    return int(raw) if raw else random.SystemRandom().randrange(2**32)


MAX_REQUEST_BYTES = 16 * 1024
REASON = "x-rundispatch-reason"
REQUIRED = ("run_id", "flow_id", "connection_id", "requested_by", "mode")
KNOWN = {*REQUIRED, "priority", "inputs", "queue_timeout_s", "max_run_s", "submitted_at"}


@dataclass(frozen=True)
class Sample:
    kind: str  # "valid" or the kind of damage
    body: bytes
    routing_key: str = "submit"
    content_type: str | None = "application/json"
    content_encoding: str | None = None
    run_id: str | None = None  # valid requests only


@pytest.fixture
def settings() -> Settings:
    return new_settings(max_request_bytes=MAX_REQUEST_BYTES)


# ---- strategies ---------------------------------------------------------------------------------
SAFE_ID = st.text(string.ascii_letters + string.digits + "_.:@-", min_size=1, max_size=40)
# Any text JSON can carry (no lone surrogates): NULs, controls, emoji, right-to-left marks...
TEXT = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=60)
LEAF = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT
)
JSON_VALUE = st.recursive(
    LEAF,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
NOT_A_STRING = (
    st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.booleans()
    | st.none()
    | st.lists(st.integers(), max_size=3)
    | st.dictionaries(SAFE_ID, st.integers(), max_size=2)
)
NOT_A_REASON = (
    st.integers(min_value=1)
    | st.just(True)
    | st.lists(st.integers(), min_size=1, max_size=3)
    | st.dictionaries(SAFE_ID, st.integers(), min_size=1, max_size=2)
)
NOT_AN_OBJECT = LEAF | st.lists(JSON_VALUE, max_size=4)
NOT_A_NUMBER = st.booleans() | TEXT | st.lists(st.integers(), max_size=2)
NOT_POSITIVE = st.integers(max_value=0) | st.floats(max_value=0, allow_nan=False)
HUGE_NUMBER = st.integers(min_value=10**309, max_value=10**400) | st.integers(
    min_value=-(10**400), max_value=-(10**309)
)
WRONG_TYPES: dict[str, st.SearchStrategy[Any]] = {
    "run_id": NOT_A_STRING,
    "flow_id": NOT_A_STRING,
    "connection_id": NOT_A_STRING,
    "requested_by": NOT_A_STRING,
    "mode": st.sampled_from(["sometimes", "ATTENDED", ""]) | st.integers() | st.none(),
    "priority": st.sampled_from(["urgent", "HIGH", ""]) | st.integers() | st.none(),
    "inputs": st.lists(st.integers(), max_size=3) | TEXT | st.integers() | st.none(),
    "queue_timeout_s": NOT_A_NUMBER | NOT_POSITIVE,
    "max_run_s": NOT_A_NUMBER | NOT_POSITIVE,
    "submitted_at": st.booleans()
    | st.lists(st.integers(), max_size=2)
    | st.text("qwxyz", min_size=1),
}


@st.composite
def request(draw: st.DrawFn) -> dict[str, Any]:
    """A valid run request; hostile but legal text and inputs."""
    inputs = draw(st.dictionaries(TEXT, JSON_VALUE, max_size=4))
    inputs.pop("outcome", None)
    inputs["duration_s"] = 0
    body: dict[str, Any] = {
        "run_id": draw(SAFE_ID),
        "flow_id": draw(TEXT),
        "connection_id": "c1",
        "requested_by": OWNER,
        "mode": "unattended",
        "inputs": inputs,
    }
    if draw(st.booleans()):
        body["priority"] = draw(st.sampled_from(["high", "normal"]))
    if draw(st.booleans()):
        body["queue_timeout_s"] = draw(st.integers(60, 3600) | st.floats(60, 3600))
    if draw(st.booleans()):
        body["max_run_s"] = draw(st.integers(30, 600) | st.floats(30, 600))
    return body


def encoded(body: Any) -> bytes:
    return json.dumps(body).encode()


def damaged(kind: str) -> st.SearchStrategy[Sample]:
    """Malformed or hostile messages of one kind."""
    damage = DAMAGE[kind]

    @st.composite
    def sample(draw: st.DrawFn) -> Sample:
        return damage(draw, draw(request()))

    return sample()


def wrong_type(draw: st.DrawFn, body: dict[str, Any]) -> Sample:
    field = draw(st.sampled_from(sorted(WRONG_TYPES)))
    body[field] = draw(WRONG_TYPES[field])
    return Sample(f"wrong_type:{field}", encoded(body))


def out_of_range(draw: st.DrawFn, body: dict[str, Any]) -> Sample:
    """Integers no float can hold, where the model expects seconds or a time."""
    field = draw(st.sampled_from(["queue_timeout_s", "max_run_s", "submitted_at"]))
    body[field] = draw(HUGE_NUMBER)
    return Sample(f"out_of_range:{field}", encoded(body))


def missing_field(draw: st.DrawFn, body: dict[str, Any]) -> Sample:
    del body[draw(st.sampled_from(REQUIRED))]
    return Sample("missing_field", encoded(body))


def oversize(draw: st.DrawFn, body: dict[str, Any]) -> Sample:
    size = draw(st.integers(MAX_REQUEST_BYTES + 1, 2 * MAX_REQUEST_BYTES))
    # Printable ASCII that JSON does not escape, so the body is about ``size`` bytes.
    text = draw(st.characters(min_codepoint=32, max_codepoint=126, exclude_characters='"\\')) * size
    if draw(st.booleans()):
        body["flow_id"] = text
    else:
        body["inputs"]["blob"] = text
    return Sample("oversize", encoded(body))


def too_long_field(draw: st.DrawFn, body: dict[str, Any]) -> Sample:
    if draw(st.booleans()):
        body["flow_id"] = "f" * draw(st.integers(257, 2000))
    else:
        body["run_id"] = "r" * draw(st.integers(129, 1000))
    return Sample("too_long_field", encoded(body))


def deep_nesting(draw: st.DrawFn, body: dict[str, Any]) -> Sample:
    # Past the model's inputs depth limit (33..150), or past the JSON parser's (400..3000);
    # spliced in as text (json.dumps itself would hit Python's recursion limit).
    depth = draw(st.integers(33, 150) | st.integers(400, 3000))
    opening, closing = ("[", "]") if draw(st.booleans()) else ('{"k":', "}")
    body["inputs"] = {"deep": "@DEEP@"}
    raw = encoded(body).replace(b'"@DEEP@"', (opening * depth + "0" + closing * depth).encode())
    return Sample("deep_nesting", raw)


def invalid_utf8(draw: st.DrawFn, body: dict[str, Any]) -> Sample:
    raw = encoded(body)
    bad = draw(
        st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80"])
    )
    at = draw(st.integers(0, len(raw)))
    return Sample("invalid_utf8", raw[:at] + bad + raw[at:])


def wrong_content_type(draw: st.DrawFn, body: dict[str, Any]) -> Sample:
    if draw(st.booleans()):
        content_type = draw(
            st.sampled_from(["text/plain", "application/xml", "application/octet-stream"])
            | st.text(string.ascii_letters + "/-+", min_size=1, max_size=30).filter(
                lambda t: t != "application/json"
            )
        )
        return Sample("content_type", encoded(body), content_type=content_type)
    encoding = draw(st.sampled_from(["gzip", "deflate", "br", "base64"]))
    return Sample("content_encoding", encoded(body), content_encoding=encoding)


def unknown_field(draw: st.DrawFn, body: dict[str, Any]) -> Sample:
    name = draw(TEXT.filter(lambda t: t not in KNOWN))
    body[name] = draw(JSON_VALUE)
    return Sample("unknown_field", encoded(body))


def not_an_object(draw: st.DrawFn, body: dict[str, Any]) -> Sample:
    value = draw(NOT_AN_OBJECT | st.just([body]))
    return Sample("not_an_object", encoded(value))


def nan_or_infinity(draw: st.DrawFn, body: dict[str, Any]) -> Sample:
    value = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    where = draw(st.sampled_from(["queue_timeout_s", "max_run_s", "inputs"]))
    if where == "inputs":
        body["inputs"][draw(TEXT)] = [value]
    else:
        body[where] = value
    return Sample("nan_or_infinity", json.dumps(body, allow_nan=True).encode())


def hostile_id(draw: st.DrawFn, body: dict[str, Any]) -> Sample:
    bad = draw(st.sampled_from([" ", "/", "\\", "../", "#", "?", "*", "\n", "\t", "é", "\x00"]))
    field = draw(st.sampled_from(["run_id", "connection_id"]))
    body[field] = draw(SAFE_ID) + bad + draw(st.text(string.ascii_letters, max_size=5))
    return Sample(f"hostile_id:{field}", encoded(body))


def broken_json(draw: st.DrawFn, body: dict[str, Any]) -> Sample:
    raw = encoded(body)
    return Sample("broken_json", raw[: draw(st.integers(0, len(raw) - 1))])


def bad_cancel(draw: st.DrawFn, body: dict[str, Any]) -> Sample:
    stranger = draw(TEXT.filter(lambda t: t not in {"run_id", "reason"}))
    cancel = draw(
        st.fixed_dictionaries({"run_id": NOT_A_STRING})
        | st.fixed_dictionaries({"run_id": SAFE_ID, "reason": NOT_A_REASON})
        | st.fixed_dictionaries({"run_id": SAFE_ID, stranger: LEAF})
        | NOT_AN_OBJECT
    )
    return Sample("bad_cancel", encoded(cancel), routing_key="cancel")


DAMAGE = {
    fn.__name__: fn
    for fn in (
        wrong_type,
        out_of_range,
        missing_field,
        oversize,
        too_long_field,
        deep_nesting,
        invalid_utf8,
        wrong_content_type,
        unknown_field,
        not_an_object,
        nan_or_infinity,
        hostile_id,
        broken_json,
        bad_cancel,
    )
}


@st.composite
def valid(draw: st.DrawFn) -> Sample:
    body = draw(request())
    return Sample("valid", encoded(body), run_id=body["run_id"])


def generate(count: int, fuzz: int, valid_share: float = 0.25) -> list[Sample]:
    """``count`` messages: a quarter valid, the rest spread evenly over the kinds of damage,
    each kind's messages drawn by hypothesis (generate phase only) from seeds derived from
    ``fuzz``, then shuffled with it: one seed, one batch."""
    valid_count = int(count * valid_share)
    per_kind, extra = divmod(count - valid_count, len(DAMAGE))
    samples = draw_samples(valid(), valid_count, fuzz * 100)
    for position, kind in enumerate(sorted(DAMAGE)):
        draws = draw_samples(
            damaged(kind), per_kind + (position < extra), fuzz * 100 + 1 + position
        )
        samples += draws
    random.Random(fuzz).shuffle(samples)
    return unique_run_ids(samples)


def draw_samples(strategy: st.SearchStrategy[Sample], count: int, base: int) -> list[Sample]:
    samples: list[Sample] = []
    attempt = 0
    while len(samples) < count:

        @seed(base * 1000 + attempt)
        @hypothesis_settings(
            max_examples=count,
            database=None,
            deadline=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(strategy)
        def collect(sample: Sample) -> None:
            samples.append(sample)

        collect()
        attempt += 1
    return samples[:count]


def save_failure(fuzz: int, samples: list[Sample], wrong: set[bytes]) -> Path:
    """Every message of the batch, whole, the ones that went wrong flagged."""
    FAILURES.mkdir(exist_ok=True)
    path = FAILURES / f"{fuzz}.jsonl"
    with path.open("w", encoding="utf-8") as out:
        for sample in samples:
            entry = asdict(sample)
            entry["body"] = base64.b64encode(sample.body).decode()
            entry["wrong"] = sample.body in wrong
            out.write(json.dumps(entry) + "\n")
    return path


def unique_run_ids(samples: list[Sample]) -> list[Sample]:
    """Valid requests get distinct run ids (hypothesis' ids, made unique by a suffix)."""
    result = []
    for index, sample in enumerate(samples):
        if sample.kind != "valid":
            result.append(sample)
            continue
        body = json.loads(sample.body)
        body["run_id"] = f"{body['run_id']}-{index}"
        result.append(Sample("valid", encoded(body), run_id=body["run_id"]))
    return result


# ---- the test -----------------------------------------------------------------------------------
def fleet() -> dict[str, Any]:
    return fleet_document(
        groups=[{"group_id": "fuzz", "name": "Fuzz bots"}],
        machines=[
            {
                "machine_id": f"f{i}",
                "name": f"FUZZ-{i}",
                "group_id": "fuzz",
                "os": "windows_server",
                "max_unattended_runs": 10,
            }
            for i in (1, 2)
        ],
        connections=[
            {
                "connection_id": "c1",
                "owner": OWNER,
                "kind": "credentials",
                "target": {"group_id": "fuzz"},
                "username": "CONTOSO\\svc-fuzz",
                "password": "s3cret-pw",
            }
        ],
    )


async def publish(settings: Settings, samples: list[Sample]) -> None:
    names = Names(settings.namespace)
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(names.requests_exchange)
        for start in range(0, len(samples), 100):
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(
                            sample.body,
                            content_type=sample.content_type,
                            content_encoding=sample.content_encoding,
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                            user_id=admin_user_of(settings.amqp_url.get_secret_value()),
                        ),
                        sample.routing_key,
                    )
                    for sample in samples[start : start + 100]
                )
            )


async def drain_dead_letters(
    settings: Settings, expected: int, timeout: float
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    names = Names(settings.namespace)
    received: list[aio_pika.abc.AbstractIncomingMessage] = []
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(names.dead_queue)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = await queue.get(no_ack=True, fail=False)
            if message is not None:
                received.append(message)
            elif len(received) >= expected:
                break
            else:
                await asyncio.sleep(0.2)
    return received


async def test_hostile_requests_are_dead_lettered_and_valid_ones_complete(
    client: Client,
    settings: Settings,
    procs: Processes,
    apply_fleet: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    began = time.monotonic()
    fuzz = fuzz_seed()
    samples = generate(MESSAGES, fuzz)
    generated = time.monotonic() - began
    kinds = Counter(s.kind.split(":")[0] for s in samples)
    bad = [s for s in samples if s.kind != "valid"]
    good = [s for s in samples if s.kind == "valid"]
    assert len(bad) > 1000 and len(good) > 300, kinds
    assert len({s.kind.split(":")[0] for s in bad}) >= len(DAMAGE), kinds

    apply_fleet(fleet())
    dispatcher = procs.dispatcher()
    for machine_id in ("f1", "f2"):
        procs.worker(machine_id)
    await publish(settings, samples)
    published = time.monotonic() - began

    run_ids = [s.run_id for s in good if s.run_id]
    deadline = time.monotonic() + 90
    while True:
        runs = await client.rt.runs.get_many(run_ids)
        if all(r is not None and r.status.terminal for r in runs):
            break
        if time.monotonic() > deadline:
            stuck = [i for i, r in zip(run_ids, runs, strict=True) if not (r and r.status.terminal)]
            saved = save_failure(fuzz, samples, {s.body for s in good if s.run_id in set(stuck)})
            raise AssertionError(
                f"{len(stuck)} valid runs did not complete: {stuck[:5]} "
                f"(RUNDISPATCH_FUZZ_SEED={fuzz}, the batch is saved in {saved})"
            )
        await asyncio.sleep(0.5)
    statuses = Counter(r.status.value for r in runs if r is not None)
    dead = await drain_dead_letters(settings, len(bad), timeout=60)

    expected = Counter(s.body for s in bad)
    got = Counter(m.body for m in dead)
    missing = expected - got
    unexpected = got - expected
    without_reason = [m.body[:80] for m in dead if not (m.headers or {}).get(REASON)]
    reasons = Counter(str((m.headers or {}).get(REASON, ""))[:40] for m in dead)
    with capsys.disabled():
        print(
            f"\nfuzz (RUNDISPATCH_FUZZ_SEED={fuzz}): {len(samples)} messages "
            f"({len(bad)} bad, {len(good)} valid) by kind "
            f"{dict(kinds)}; generated in {generated:.1f} s, published at {published:.1f} s, "
            f"done at {time.monotonic() - began:.1f} s; valid runs {dict(statuses)}; "
            f"dead-lettered {len(dead)}; top reasons {reasons.most_common(5)}",
            flush=True,
        )
    kind_of = {s.body: s.kind for s in bad}
    unfinished = {
        s.body
        for s, run in zip(good, runs, strict=True)
        if run is None or run.status is not RunStatus.succeeded
    }
    wrong = set(missing) | set(unexpected) | unfinished
    wrong |= {m.body for m in dead if not (m.headers or {}).get(REASON)}
    if wrong:
        saved = save_failure(fuzz, samples, wrong)
        with capsys.disabled():
            print(f"fuzz: the batch is saved whole in {saved}", flush=True)
    assert not missing, [(kind_of[b], b) for b in list(missing)[:10]]
    assert not unexpected, list(unexpected)[:10]
    assert not without_reason, without_reason[:10]
    assert statuses == {RunStatus.succeeded.value: len(good)}, statuses
    executions = Counter(e["run_id"] for e in procs.executions())
    assert set(executions) == set(run_ids) and max(executions.values()) == 1
    # Nothing crashed or restarted: the same dispatcher process served everything.
    assert procs.procs["dispatcher"] is dispatcher and procs.alive("dispatcher")
    assert all(procs.alive(f"worker-{m}") for m in ("f1", "f2"))
    log = procs.log_text("dispatcher")
    assert "failed; messages go back to the queue" not in log, log[-3000:]
