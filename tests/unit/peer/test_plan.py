"""Steps announced ahead (`peer.plan`): the coordinator announces training steps in chunks and
evaluation steps one by one; a follower keeps what was announced, bounded, and refuses what breaks
the order or does not add up."""

from __future__ import annotations

import numpy as np
import pytest

from secure_split.errors import LocalProtocolError, RemoteProtocolError
from secure_split.peer.plan import Announcement, Announcer, StepPlan
from secure_split.peer.steps import ids_to_wire
from secure_split.protocol import Binding, Kind, Message


def _epoch(train: int, evaluation: int, batch: int = 4) -> list[tuple[str, np.ndarray]]:
    ids = np.arange(1000, 1000 + batch * (train + evaluation), dtype=np.int64).reshape(-1, batch)
    return [("train", b) for b in ids[:train]] + [("eval", b) for b in ids[train:]]


def _message(a: Announcement, epoch: int = 0, *, sender: str = "lab") -> Message:
    return Message(Kind.STEP_BEGIN, Binding("0" * 64, bytes(16), a.step, 1, sender, "owner"),
                   meta=a.meta(epoch), tensors=(ids_to_wire(a.ids),))


def test_training_steps_go_in_chunks_evaluation_steps_one_by_one_lookahead_ahead() -> None:
    plan = _epoch(train=10, evaluation=3)
    ann = Announcer(plan, 500, lookahead=1, chunk=4)
    first = ann.through(0)  # before the coordinator begins step 0
    assert [(a.step, a.phase, a.sizes) for a in first] == [(500, "train", (4, 4, 4, 4))]
    assert ann.through(0 + 1) == []  # after it began: step 1 is announced already
    sent = {0: first}
    for i in range(1, len(plan)):
        sent[i] = ann.through(i) + ann.through(i + ann.lookahead)
    assert {i: [(a.step, a.phase, a.sizes) for a in x] for i, x in sent.items() if x} == {
        0: [(500, "train", (4, 4, 4, 4))],
        3: [(504, "train", (4, 4, 4, 4))],  # one step before it is due
        7: [(508, "train", (4, 4))],  # a chunk stops where training does
        9: [(510, "eval", None)], 10: [(511, "eval", None)], 11: [(512, "eval", None)],
    }
    # every step announced exactly once, in order, with its own ids
    announced = [a for i in sorted(sent) for a in sent[i]]
    ids = np.concatenate([a.ids for a in announced])
    assert np.array_equal(ids, np.concatenate([b for _, b in plan]))
    assert [a.last_step for a in announced][-1] == 512


def test_lookahead_and_the_id_bound_shape_the_chunks() -> None:
    plan = _epoch(train=6, evaluation=2)
    ann = Announcer(plan, 0, lookahead=3, chunk=32, max_ids=9)
    assert [a.sizes for a in ann.through(0)] == [(4, 4)]  # a third batch would pass 9 ids
    assert [(a.step, a.sizes) for a in ann.through(3)] == [(2, (4, 4))]
    assert [(a.step, a.phase) for a in ann.through(5 + 3)] == [(4, "train"), (6, "eval"), (7, "eval")]  # clipped
    one = Announcer(plan, 0, lookahead=1, max_ids=1)  # a batch larger than the bound still goes, alone
    assert [a.sizes for a in one.through(1)] == [None, None]
    with pytest.raises(ValueError):
        Announcer(plan, 0, lookahead=0)


def test_a_follower_keeps_announced_steps_in_order_within_its_bound() -> None:
    ann = Announcer(_epoch(train=6, evaluation=1), 10, lookahead=1, chunk=4)
    plan = StepPlan(bound=5, coordinator="lab", me="owner")
    chunk, rest = ann.through(0)[0], ann.through(5)
    assert plan.offer(_message(chunk, epoch=3)) and len(plan) == 4 and plan.last_step == 13
    assert not plan.offer(_message(rest[0]))  # 2 more would pass the bound: kept for later
    first = plan.pop()
    assert (first.step, first.phase, first.epoch, list(first.ids)) == (10, "train", 3, [1000, 1001, 1002, 1003])
    assert plan.offer(_message(rest[0])) and [plan.pop().step for _ in range(len(plan))] == [11, 12, 13, 14, 15]
    assert plan.next() is None
    plan.clear()
    with pytest.raises(RemoteProtocolError, match="announced already"):
        plan.offer(_message(rest[0]))  # steps stay unique across a rollback


def test_a_malformed_announcement_is_refused() -> None:
    plan = StepPlan(bound=64, coordinator="lab", me="owner")
    ids = np.arange(8, dtype=np.int64)
    for sizes, why in (((3, 3), "do not split"), ((8, 0), "do not split")):
        with pytest.raises(RemoteProtocolError, match=why):
            plan.offer(_message(Announcement(5, "train", ids, sizes)))
    with pytest.raises(RemoteProtocolError, match="repeats sample ids"):
        plan.offer(_message(Announcement(5, "train", np.array([1, 2, 3, 3]), (2, 2))))
    good = Announcement(5, "train", ids, (4, 4))
    with pytest.raises(RemoteProtocolError, match="only the coordinator 'lab'"):
        plan.offer(_message(good, sender="mallory"))
    with pytest.raises(RemoteProtocolError, match="only the coordinator"):
        StepPlan(bound=64, coordinator="lab", me="lab").offer(_message(good))  # the coordinator takes none
    assert len(plan) == 0 and plan.last_step == -1  # nothing kept from a refused one
    with pytest.raises(LocalProtocolError):  # the codec's rule: sizes are counts
        _message(Announcement(5, "train", ids, (9, -1)))
