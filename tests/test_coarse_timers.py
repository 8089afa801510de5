"""runtime/coarse_timers.py: per-stream deadlines in shared time slots, one loop timer per loop."""

import asyncio
import sys

from tornado.testing import AsyncTestCase, gen_test

from runtime import coarse_timers
from runtime.coarse_timers import RESOLUTION


class CoarseTimersTest(AsyncTestCase):
    def wheel(self) -> coarse_timers.TimerWheel:
        return coarse_timers._wheels[asyncio.get_running_loop()]

    @gen_test
    async def test_each_fires_once_not_before_its_time_and_in_order(self) -> None:
        loop = asyncio.get_running_loop()
        fired: list[tuple[float, float, str]] = []
        done = asyncio.Event()
        delays = [0.13, 0.01, 0.05, 0.0, 0.2, 0.05]
        for i, delay in enumerate(delays):
            wanted = loop.time() + delay

            def note(i: int = i, wanted: float = wanted) -> None:
                fired.append((loop.time(), wanted, i))
                if len(fired) == len(delays):
                    done.set()

            coarse_timers.call_later(delay, note)
        await asyncio.wait_for(done.wait(), 5)
        for at, wanted, i in fired:
            self.assertGreaterEqual(at, wanted - 0.001, f"timer {i} fired early")
        self.assertEqual(sorted(i for _, _, i in fired), list(range(len(delays))))
        self.assertEqual([at for at, _, _ in fired], sorted(at for at, _, _ in fired))
        order = [i for _, _, i in fired]
        # Slots fire in time order (within one slot: in the order they were set).
        self.assertLess(max(order.index(1), order.index(3)), order.index(2))
        self.assertLess(max(order.index(2), order.index(5)), order.index(0))
        self.assertEqual(order[-1], 4)
        self.assertEqual(self.wheel().slots, {})  # nothing left behind

    @gen_test
    async def test_a_cancelled_timer_never_fires_and_is_forgotten_at_once(self) -> None:
        fired = []
        done = asyncio.Event()
        timers = [coarse_timers.call_later(0.05, lambda i=i: fired.append(i)) for i in range(100)]
        coarse_timers.call_later(0.1, done.set)
        for timer in timers[::2]:
            timer.cancel()
            timer.cancel()  # twice is harmless
            self.assertTrue(timer.cancelled())
        kept = sum(len(timers) for timers in self.wheel().slots.values())
        self.assertEqual(kept, 51)  # the 50 left and done.set
        await asyncio.wait_for(done.wait(), 5)
        self.assertEqual(sorted(fired), list(range(1, 100, 2)))

    @gen_test
    async def test_cancelling_the_earliest_rearms_for_the_next(self) -> None:
        done = asyncio.Event()
        early = coarse_timers.call_later(0.02, lambda: self.fail("cancelled, yet fired"))
        coarse_timers.call_later(0.08, done.set)
        early.cancel()
        await asyncio.wait_for(done.wait(), 5)

    @gen_test
    async def test_a_timer_set_by_a_callback_waits_for_the_next_pass(self) -> None:
        # A callback that keeps setting 0 s timers must not hold the loop in one pass.
        loop = asyncio.get_running_loop()
        passes = []
        other_ran = asyncio.Event()

        def again() -> None:
            passes.append(loop.time())
            if not other_ran.is_set():
                coarse_timers.call_later(0, again)

        coarse_timers.call_later(0, again)
        loop.call_soon(other_ran.set)
        await asyncio.wait_for(other_ran.wait(), 5)
        self.assertLess(len(passes), 10)

    @gen_test
    async def test_an_error_in_one_callback_spares_the_others(self) -> None:
        loop = asyncio.get_running_loop()
        reported = []
        loop.set_exception_handler(lambda _loop, context: reported.append(context))
        fired = asyncio.Event()

        def broken() -> None:
            raise RuntimeError("boom")

        coarse_timers.call_later(0.01, broken)
        coarse_timers.call_later(0.01, fired.set)
        await asyncio.wait_for(fired.wait(), 5)
        self.assertEqual(len(reported), 1)
        self.assertIsInstance(reported[0]["exception"], RuntimeError)

    @gen_test
    async def test_thousands_of_deadlines_keep_one_loop_timer(self) -> None:
        loop = asyncio.get_running_loop()
        before = len(getattr(loop, "_scheduled", []))
        timers = [coarse_timers.call_later(1 + i * 0.001, lambda: None) for i in range(5000)]
        wheel = self.wheel()
        self.assertIsNotNone(wheel.armed_for)
        if hasattr(loop, "_scheduled"):  # asyncio's loop shows its timers
            self.assertEqual(len(loop._scheduled) - before, 1)
        # One slot per RESOLUTION of the 5 s they span (a few more: setting them takes time).
        self.assertGreaterEqual(len(wheel.slots), 5 / RESOLUTION)
        self.assertLess(len(wheel.slots), 5 / RESOLUTION + 50)
        # Far smaller than a loop timer (uvloop's TimerHandle with its libuv handle: ~540 B).
        self.assertLess(sys.getsizeof(timers[0]), 80)
        for timer in timers:
            timer.cancel()
        self.assertEqual(wheel.slots, {})

    def test_each_loop_has_its_own_wheel_and_does_not_keep_it(self) -> None:
        import gc
        import weakref

        async def one() -> tuple:
            done = asyncio.Event()
            coarse_timers.call_later(0.01, done.set)
            coarse_timers.call_later(60, lambda: None)  # still pending when the loop ends
            await asyncio.wait_for(done.wait(), 5)
            loop = asyncio.get_running_loop()
            wheel = coarse_timers._wheels[loop]
            self.assertIs(wheel.loop, loop)
            return weakref.ref(loop), weakref.ref(wheel)

        first = asyncio.run(one())
        second = asyncio.run(one())
        gc.collect()
        for loop, wheel in (first, second):
            self.assertIsNone(loop())  # not kept alive by its wheel
            self.assertIsNone(wheel())
