"""Offload: a worker's repeated computation runs in a thread until it is measured quick, then
on the loop, and back in a thread once a call took long."""

import threading
import time

from psctl.cluster.worker import Offload


def where(spin_s: float = 0.0) -> int:
    end = time.perf_counter() + spin_s
    while time.perf_counter() < end:  # a computation of this length, not a wait for anything
        pass
    return threading.get_ident()


async def test_the_first_call_runs_in_a_thread_then_quick_ones_on_the_loop():
    loop_thread = threading.get_ident()
    offload = Offload(inline_s=0.2)
    assert await offload(where) != loop_thread
    assert await offload(where) == loop_thread and await offload(where) == loop_thread


async def test_a_slow_call_sends_the_next_to_a_thread_and_a_quick_one_brings_it_back():
    loop_thread = threading.get_ident()
    offload = Offload(inline_s=0.2)
    await offload(where)
    assert await offload(where, 0.4) == loop_thread  # measured quick before: ran inline, took long
    assert await offload(where) != loop_thread
    assert await offload(where) == loop_thread


async def test_an_error_propagates_and_the_next_call_still_runs():
    offload = Offload()

    def fail():
        raise ValueError("model code failed")

    for _ in range(2):
        try:
            await offload(fail)
        except ValueError as exc:
            assert str(exc) == "model code failed"
        else:
            raise AssertionError("no error")
    assert await offload(where) == threading.get_ident()
