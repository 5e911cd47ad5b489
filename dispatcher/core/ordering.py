"""Queue order: priority, then enqueue time, with aging.

A run's order score is its enqueue time, minus ``priority_boost_s`` when it is high priority.
Lower scores go first; equal scores fall back to the run id (a Redis sorted set orders equal
scores by member), so the order is total and stable.
With the boost finite, a normal run that has waited longer than the boost is ahead of every
high-priority run enqueued after it: nothing starves.
"""

from __future__ import annotations

from dispatcher.models import Priority


def order_score(priority: Priority, enqueued_at: float, priority_boost_s: float) -> float:
    """Score of a run in its target's queue (lower runs first)."""
    if priority is Priority.high:
        return enqueued_at - priority_boost_s
    return enqueued_at


def rescore(score: float, old: Priority, new: Priority, priority_boost_s: float) -> float:
    """The score of a queued run whose priority changes from ``old`` to ``new``."""
    if old is new:
        return score
    return score - priority_boost_s if new is Priority.high else score + priority_boost_s


def top_score(current_head_score: float | None, fallback: float) -> float:
    """A score ahead of the current head of a queue (move-to-top)."""
    if current_head_score is None:
        return fallback
    return min(current_head_score, fallback) - 1.0


def lane_of(connection_id: str, mode: str, priority: str) -> str:
    """Runs of a target with the same lane are eligible for exactly the same machines.

    Placement looks at the head of each lane instead of at every queued run, so its cost
    depends on the number of lanes, never on the backlog.
    """
    return f"{connection_id}|{mode}|{priority}"
