"""The serving process's garbage collector settings."""

from __future__ import annotations

import gc

from dispatcher.process import YOUNG_COLLECTION_EVERY, tune_garbage_collector


def test_young_objects_are_collected_less_often_the_older_generations_as_before() -> None:
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        tune_garbage_collector()
        assert gc.get_threshold() == (YOUNG_COLLECTION_EVERY, 10, 10)
        assert YOUNG_COLLECTION_EVERY > 700
    finally:
        gc.set_threshold(*before)
