"""The session loop's clock: batches on a grid of 250 ms, the once-a-second turn on every fourth."""
from bpftrace_hostport.collect.session import BATCH_PERIOD_S, batch_due


def test_batches_keep_to_their_grid_when_a_wake_up_is_late():
    assert batch_due(100.0, 100.003) == 100.0 + BATCH_PERIOD_S
    assert batch_due(100.0, 100.2) == 100.0 + BATCH_PERIOD_S


def test_a_loop_a_whole_period_behind_waits_a_period_instead_of_catching_up():
    assert batch_due(100.0, 100.9) == 100.9 + BATCH_PERIOD_S
    assert batch_due(100.0, 100.0 + BATCH_PERIOD_S) == 100.0 + 2 * BATCH_PERIOD_S


def test_every_fourth_batch_is_the_once_a_second_turn():
    """The loop's rule (session._loop): the slow turn runs at a batch at most half a period
    before it is due, so on the grid it is exactly every fourth batch."""
    from bpftrace_hostport.collect.session import SLOW_PERIOD_S
    due, next_slow, slow = 50.0, 50.0, []
    for i in range(12):
        tick, due = due, batch_due(due, due + 0.004)      # each wake-up 4 ms late
        if tick >= next_slow - BATCH_PERIOD_S / 2:
            next_slow = tick + SLOW_PERIOD_S
            slow.append(i)
    assert slow == [0, 4, 8]
