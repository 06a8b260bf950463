"""OneBehind: each result is finished after the next one is dispatched, in order, and flush finishes the last."""
import pytest

from maskx_jax.one_behind import OneBehind


def test_results_are_finished_one_dispatch_late_and_in_order():
    events = []
    behind = OneBehind(lambda r: events.append(f"finish {r}"))
    for r in ("a", "b", "c"):
        events.append(f"dispatch {r}")
        behind.push(r)
    assert events == ["dispatch a", "dispatch b", "finish a", "dispatch c", "finish b"]
    behind.flush()
    behind.flush()  # nothing held: nothing happens
    assert events[-1] == "finish c" and events.count("finish c") == 1


def test_flush_before_a_checkpoint_then_continue():
    done = []
    behind = OneBehind(done.append)
    behind.push(1)
    behind.flush()  # e.g. the step's outcome must be known before it is saved
    assert done == [1]
    behind.push(2)
    behind.push(3)
    assert done == [1, 2]


def test_an_error_in_finish_reaches_the_caller():
    def finish(r):
        raise ValueError(f"bad {r}")

    behind = OneBehind(finish)
    behind.push("x")
    with pytest.raises(ValueError, match="bad x"):
        behind.push("y")
