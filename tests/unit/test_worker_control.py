"""The worker's side of a checkpoint at one clock: PAUSE answers where it will hold, RESUME says how far to go."""

import asyncio

import pytest

from psctl.cluster.worker import _ControlService
from psctl.protocol.wire import Message, MsgType

pytestmark = pytest.mark.timeout(10)


async def held(control: _ControlService, clock: int) -> bool:
    """Whether a step at ``clock`` is held: wait_turn suspends (on its event) instead of returning."""
    turn = control.wait_turn(clock)
    try:
        turn.send(None)
    except StopIteration:
        return False
    turn.close()
    return True


async def test_pause_answers_the_clock_a_step_under_way_will_reach():
    control = _ControlService()
    control.position = lambda: 7
    reply = control.pause(Message(MsgType.PAUSE, {"job_id": "j"}))
    assert reply is not None and reply.body == {"clock": 7}
    assert await held(control, 7)
    control.resume(Message(MsgType.RESUME, {"until": None}))
    assert not await held(control, 7) and not await held(control, 100)


async def test_resume_until_holds_every_step_from_that_clock_until_the_job_ends():
    control = _ControlService()
    control.pause(Message(MsgType.PAUSE, {}))
    waiting = asyncio.ensure_future(control.wait_turn(5))
    control.resume(Message(MsgType.RESUME, {"until": 6}))
    await asyncio.wait_for(waiting, 5)  # clock 5 < 6: goes on
    assert await held(control, 6)
    stuck = asyncio.ensure_future(control.wait_turn(6))
    control.on_event({"kind": "abort", "reason": "stopped"})
    await asyncio.wait_for(stuck, 5)  # an abort releases the held step (the loop then raises)
    assert control.abort_reason == "stopped"


async def test_an_epoch_end_holds_until_the_driver_has_read_that_epoch_or_the_job_stops():
    from psctl.errors import JobError

    control = _ControlService()
    waiting = asyncio.ensure_future(control.wait_epoch_seen(2, 5))
    control.on_event({"kind": "epoch_seen", "epoch": 1})  # an earlier epoch: still held
    await asyncio.sleep(0)
    assert not waiting.done()
    control.on_event({"kind": "epoch_seen", "epoch": 2})
    await asyncio.wait_for(waiting, 5)
    await asyncio.wait_for(control.wait_epoch_seen(1, 5), 5)  # already read: no hold
    stopping = asyncio.ensure_future(control.wait_epoch_seen(3, 5))
    control.on_event({"kind": "stop"})  # early stop: the loop then ends the training
    await asyncio.wait_for(stopping, 5)
    with pytest.raises(JobError, match="did not read epoch 5's report within 0.05 s"):
        await _ControlService().wait_epoch_seen(4, 0.05)


async def test_a_halt_ends_the_hold_and_holds_the_next_step_for_good():
    control = _ControlService()
    waiting = asyncio.ensure_future(control.wait_epoch_seen(0, 5))
    control.pause(Message(MsgType.PAUSE, {}))
    control.resume(Message(MsgType.RESUME, {"until": 4}))
    await asyncio.wait_for(waiting, 5)
    assert await held(control, 4)


async def test_resume_with_a_bad_clock_is_refused():
    from psctl.errors import RequestError

    control = _ControlService()
    with pytest.raises(RequestError, match="until"):
        control.resume(Message(MsgType.RESUME, {"until": "soon"}))


async def test_reconnect_after_a_rewind_retries_with_backoff(monkeypatch):
    from psctl.cluster import worker
    from psctl.errors import ConnectError, JobError

    monkeypatch.setattr(worker, "RECONNECT_FIRST_DELAY_S", 0.0)
    calls = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectError("the shard does not take connections yet")
        return "connected"

    assert await worker._with_backoff(flaky, lambda: None) == "connected" and len(calls) == 3

    async def never() -> str:
        raise ConnectError("down")

    with pytest.raises(ConnectError):
        await worker._with_backoff(never, lambda: None, tries=3)

    def stopped() -> None:
        raise JobError("job stopped: aborted")

    with pytest.raises(JobError):  # an abort ends the retries
        await worker._with_backoff(never, stopped)
