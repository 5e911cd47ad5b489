"""RabbitMQ's files for queues (adapters/amqp/node_files.py) and the doctor's reading of them:
the arithmetic measured by ``python -m bench.filehandles``, the thresholds of the check."""

from __future__ import annotations

from dispatcher.adapters.amqp.node_files import NodeFiles, files_per_machine
from dispatcher.tools.doctor import files_check


def test_a_machine_holds_three_files_with_a_quorum_queue_one_with_a_classic_queue() -> None:
    assert files_per_machine("quorum") == 3
    assert files_per_machine("classic") == 1
    assert files_per_machine("quorum", cluster=True) == 6  # its replies queue is quorum too


def test_the_budget_is_the_open_file_limit_less_what_rabbitmq_keeps() -> None:
    files = NodeFiles(open_file_limit=1024, quorum_queues=100, classic_queues=27)
    assert files.budget == 927
    assert files.needed == 327
    assert files.room_for(3) == 200
    assert NodeFiles(open_file_limit=0, quorum_queues=0, classic_queues=0).budget == 0


def test_the_check_warns_at_seventy_percent_and_fails_at_ninety() -> None:
    def status(quorum: int) -> str:
        files = NodeFiles(open_file_limit=1097, quorum_queues=quorum, classic_queues=0)
        return files_check(files, 3, "quorum").status

    assert [status(q) for q in (0, 233, 234, 299, 300, 400)] == [
        "ok", "ok", "warn", "warn", "FAIL", "FAIL",
    ]  # fmt: skip


def test_the_check_says_how_many_machines_fit_and_how_to_make_room() -> None:
    check = files_check(NodeFiles(1024, 290, 40), 3, "quorum")
    assert check.status == "FAIL"
    assert "910 of the 927 files" in check.detail and "room for ~5 more machines" in check.detail
    assert "LimitNOFILE" in check.fix and "RUNDISPATCH_MACHINE_QUEUE_TYPE=classic" in check.fix
    assert files_check(NodeFiles(0, 0, 0), 3, "quorum").status == "FAIL"  # no limit read
