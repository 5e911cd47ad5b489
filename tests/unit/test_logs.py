"""JSON log lines carry run_id, machine_id and target as fields: given to one call, or bound
to a task (a flow's run) or to the process (a worker's machine); secrets stay scrubbed."""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import logging

import pytest

from dispatcher.logs import ScrubbingFormatter, bind, fields

pytestmark = pytest.mark.unit


def capture(fmt_json: bool = True) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(ScrubbingFormatter(fmt_json))
    logger = logging.getLogger(f"test.logs.{id(stream)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, stream


def lines(stream: io.StringIO) -> list[dict[str, str]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_fields_of_one_call_are_json_fields() -> None:
    log, stream = capture()
    log.warning(
        "claim of run %s failed", "r1", extra=fields(run_id="r1", target="g:fin", machine_id=None)
    )
    [line] = lines(stream)
    assert line["run_id"] == "r1" and line["target"] == "g:fin"
    assert "machine_id" not in line
    assert line["message"] == "claim of run r1 failed"


def test_bound_fields_follow_the_task_that_bound_them() -> None:
    log, stream = capture()

    async def flow(run_id: str) -> None:
        bind(run_id=run_id)
        await asyncio.sleep(0)
        log.info("flow output")

    async def worker() -> None:
        bind(machine_id="m1")  # the process's machine, before its tasks start
        await asyncio.gather(flow("r1"), flow("r2"))
        log.info("worker line")

    contextvars.copy_context().run(asyncio.run, worker())
    records = lines(stream)
    flows = sorted((r["run_id"], r["machine_id"]) for r in records if r["message"] == "flow output")
    assert flows == [("r1", "m1"), ("r2", "m1")]
    [last] = [r for r in records if r["message"] == "worker line"]
    assert last["machine_id"] == "m1" and "run_id" not in last


def test_text_lines_are_unchanged_and_secrets_scrubbed() -> None:
    log, stream = capture(fmt_json=False)
    log.info("connecting to amqp://svc:hunter2@broker/", extra=fields(run_id="r1"))
    text = stream.getvalue()
    assert "hunter2" not in text and "run_id" not in text
    log, stream = capture()
    log.info("token=abc.def", extra=fields(run_id="r1"))
    [line] = lines(stream)
    assert "abc.def" not in json.dumps(line) and line["run_id"] == "r1"
