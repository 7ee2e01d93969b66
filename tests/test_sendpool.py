"""notifier.sendpool: at most `limit` sends in flight across batches, first come first served."""
import asyncio

import pytest

from notifier.sendpool import SendPool


def test_at_most_limit_in_flight_across_batches_first_come_first_served():
    started, in_flight, peak = [], [0], [0]

    async def send(item):
        started.append(item)
        in_flight[0] += 1
        peak[0] = max(peak[0], in_flight[0])
        await asyncio.sleep(0.001 * (item % 3))
        in_flight[0] -= 1
        return item * 10

    async def main():
        pool = SendPool(4, send, 30, None)
        first, second = await asyncio.gather(pool.run(list(range(0, 50))), pool.run(list(range(100, 130))))
        assert pool.in_flight == 0  # workers end with the queue
        return first, second

    first, second = asyncio.run(main())
    assert sorted(first) == [i * 10 for i in range(50)]
    assert sorted(second) == [i * 10 for i in range(100, 130)]
    assert peak[0] == 4
    assert started[:50] == list(range(50))  # the first batch queued first goes out first


def test_an_empty_batch_returns_at_once_and_a_limit_below_one_is_refused():
    async def send(item):
        raise AssertionError("nothing to send")

    assert asyncio.run(SendPool(1, send, 30, None).run([])) == []
    with pytest.raises(ValueError):
        SendPool(0, send, 30, None)


def test_cancel_stops_the_workers_and_fails_the_waiting_batches():
    async def send(item):
        await asyncio.sleep(60)

    async def main():
        pool = SendPool(2, send, 30, None)
        batch = asyncio.ensure_future(pool.run(list(range(10))))
        await asyncio.sleep(0.01)
        assert pool.in_flight == 2
        pool.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(batch, 5)
        await asyncio.sleep(0)
        assert pool.in_flight == 0

    asyncio.run(main())


def test_a_failing_send_fails_its_batch_not_the_others():
    async def send(item):
        await asyncio.sleep(0)
        if item == "bad":
            raise RuntimeError("provider bug")
        return item

    async def main():
        pool = SendPool(1, send, 30, None)
        bad, good = await asyncio.gather(pool.run(["bad"]), pool.run(["a", "b"]), return_exceptions=True)
        assert isinstance(bad, RuntimeError)
        assert good == ["a", "b"]

    asyncio.run(main())


def test_a_send_past_the_timeout_is_cancelled_and_its_result_is_on_timeout():
    cancelled = []

    async def send(item):
        try:
            await asyncio.sleep(60 if item == "stuck" else 0.01)
        except asyncio.CancelledError:
            cancelled.append(item)
            raise
        return item

    async def main():
        pool = SendPool(2, send, 0.2, lambda item: f"{item} timed out")
        results = await asyncio.wait_for(pool.run(["stuck", "a", "b", "c"]), 5)
        pool.cancel()
        return results

    results = asyncio.run(main())
    assert sorted(results) == ["a", "b", "c", "stuck timed out"]
    assert cancelled == ["stuck"]
