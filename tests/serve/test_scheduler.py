"""The scheduler's state machine with a stand-in adapter cache."""

from rankwise.serve.config import EngineConfig, SamplingParams
from rankwise.serve.kv_cache import BlockAllocator
from rankwise.serve.scheduler import Scheduler, Sequence, Status


class FakeAdapters:
    def __init__(self, ready):
        self.ready, self.refs = set(ready), {}

    def acquire(self, name):
        if name not in self.ready:
            return None
        self.refs[name] = self.refs.get(name, 0) + 1
        return sorted(self.ready).index(name)

    def release(self, name):
        self.refs[name] -= 1


def _seq(i, n, adapter=None, max_tokens=4):
    return Sequence(f"r{i}", list(range(n)), adapter, SamplingParams(max_tokens=max_tokens))


def _sched(blocks=20, **kw):
    cfg = EngineConfig(max_num_seqs=kw.pop("rows", 3), block_size=4, max_model_len=64, max_num_batched_tokens=16, **kw)
    adapters = FakeAdapters({"a"})
    return Scheduler(cfg, BlockAllocator(blocks), adapters), adapters


def _launch(plan):  # what the engine does when it launches a step
    for s in plan.seqs:
        if plan.kind == "prefill":
            s.num_cached, s.num_launched = len(s.tokens_to_prefill()), len(s.output_ids) + 1
        else:
            s.num_cached += 1
            s.num_launched += 1


def test_prefill_first_within_token_budget_and_rows_then_decode():
    s, _ = _sched()
    for i, n in enumerate((6, 8, 5, 3)):
        s.add(_seq(i, n))
    plan = s.schedule()
    assert plan.kind == "prefill" and [q.request_id for q in plan.seqs] == ["r0", "r1"]  # 6 + 8 <= 16 < 6 + 8 + 5
    _launch(plan)
    plan = s.schedule()
    assert plan.kind == "prefill" and [q.request_id for q in plan.seqs] == ["r2"]  # one row left
    _launch(plan)
    plan = s.schedule()
    assert plan.kind == "decode" and len(plan.seqs) == 3 and [q.row for q in plan.seqs] == [0, 1, 2]


def test_requests_whose_adapter_is_loading_are_passed_over_not_waited_for():
    s, adapters = _sched()
    s.add(_seq(0, 4, "b"))
    s.add(_seq(1, 4, "a"))
    plan = s.schedule()
    assert [q.request_id for q in plan.seqs] == ["r1"] and plan.seqs[0].slot == 0 and adapters.refs["a"] == 1
    assert [q.request_id for q in s.waiting] == ["r0"]


def test_out_of_blocks_preempts_the_newest_and_it_comes_back_first():
    s, adapters = _sched(blocks=6, rows=3)  # 5 usable blocks of 4 tokens
    for i in range(2):
        s.add(_seq(i, 7, "a", max_tokens=20))  # 2 blocks each
    _launch(s.schedule())
    for _ in range(2):  # positions 7 then 8: the second needs a third block for each
        plan = s.schedule()
        assert plan.kind == "decode"
        _launch(plan)
    assert s.num_preemptions == 1 and [q.request_id for q in s.running] == ["r0"]
    victim = s.waiting[0]
    assert victim.request_id == "r1" and victim.status is Status.WAITING and victim.blocks == []
    assert adapters.refs["a"] == 1 and victim.epoch == 1


def test_finish_releases_row_blocks_and_adapter():
    s, adapters = _sched()
    s.add(_seq(0, 5, "a"))
    plan = s.schedule()
    _launch(plan)
    seq = plan.seqs[0]
    free_before = s.allocator.num_free
    s.finish(seq, "stop")
    assert seq.status is Status.FINISHED and seq.row == -1 and s.allocator.num_free == free_before + 2
    assert adapters.refs["a"] == 0 and s.schedule() is None
