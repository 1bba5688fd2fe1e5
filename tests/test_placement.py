"""GPU placement and queue order, against a declared inventory: never oversubscribed, nobody starved."""

from __future__ import annotations

import random
from collections import Counter

from dmi_service_manager.jobs.placement import GIB, Card, Demand, Holding, Limits, never_fits, plan

TWO_CARDS = [Card(id="0", total=16 * GIB), Card(id="1", total=24 * GIB)]


def gpu_job(job_id: int, gib: float | None, service: str = "whisper", gpus: int = 1) -> Demand:
    return Demand(job_id=job_id, service=service, uses_gpu=True, gpus=gpus,
                  gpu_memory=None if gib is None else int(gib * GIB))


def test_jobs_fill_cards_by_best_fit_without_oversubscribing() -> None:
    result = plan([gpu_job(1, 10), gpu_job(2, 10), gpu_job(3, 10), gpu_job(4, 10)], [], TWO_CARDS,
                  Limits(max_jobs=10), {})
    placed = {demand.job_id: ids for demand, ids in result.start}
    # 10 GiB fits the 16 GiB card best; the second goes to the 24 GiB card, the third beside it.
    assert placed == {1: ["0"], 2: ["1"], 3: ["1"]}
    assert "waiting for 10.0 GiB of GPU memory" in result.waiting[4]


def test_a_job_without_an_estimate_takes_a_whole_card() -> None:
    result = plan([gpu_job(1, None), gpu_job(2, 1), gpu_job(3, None)], [], TWO_CARDS, Limits(max_jobs=10), {})
    placed = {demand.job_id: ids for demand, ids in result.start}
    assert placed[1] == ["1"] or placed[1] == ["0"]
    assert 3 not in placed and 2 in placed
    assert set(placed[2]) != set(placed[1])


def test_running_jobs_hold_their_cards() -> None:
    holding = [Holding(job_id=9, service="whisper", gpu_ids=("1",), gpu_memory=20 * GIB)]
    result = plan([gpu_job(1, 10)], holding, TWO_CARDS, Limits(max_jobs=10), {})
    assert result.start[0][1] == ["0"]
    result = plan([gpu_job(2, 18)], holding, TWO_CARDS, Limits(max_jobs=10), {})
    assert result.start == []


def test_memory_used_outside_this_server_counts_on_an_idle_card() -> None:
    cards = [Card(id="0", total=24 * GIB, free=2 * GIB)]
    assert plan([gpu_job(1, 10)], [], cards, Limits(max_jobs=10), {}).start == []


def test_multi_gpu_jobs_get_distinct_cards() -> None:
    cards = [Card(id=str(i), total=16 * GIB) for i in range(3)]
    result = plan([gpu_job(1, 8, gpus=2), gpu_job(2, 12, gpus=2)], [], cards, Limits(max_jobs=10), {})
    placed = {demand.job_id: ids for demand, ids in result.start}
    assert len(set(placed[1])) == 2
    assert 2 not in placed  # only one card still has 12 GiB free


def test_limits_global_and_per_service() -> None:
    cpu = [Demand(job_id=i, service="ocr") for i in range(1, 6)]
    result = plan(cpu, [], [], Limits(max_jobs=3, per_service={"ocr": 2}), {})
    assert [d.job_id for d, _ in result.start] == [1, 2]
    assert "ocr already runs its maximum of 2" in result.waiting[3]
    result = plan([*cpu, Demand(job_id=9, service="blip")], [], [], Limits(max_jobs=3, per_service={"ocr": 2}), {})
    assert [d.job_id for d, _ in result.start] == [1, 2, 9]


def test_a_small_job_may_pass_a_big_one_only_a_bounded_number_of_times() -> None:
    holding = [Holding(job_id=100, service="sd", gpu_ids=("1",), gpu_memory=6 * GIB)]
    passes: dict[int, int] = {}
    started = []
    for job_id in range(1, 10):
        waiting = [gpu_job(0, 24), gpu_job(job_id, 1)]
        result = plan(waiting, holding, TWO_CARDS, Limits(max_jobs=50, max_passes=3), passes)
        passes = result.passes
        started += [d.job_id for d, _ in result.start]
    assert started == [1, 2, 3]  # then job 0 has been passed three times: nothing passes it again
    assert passes[0] == 3
    result = plan([gpu_job(0, 24), gpu_job(50, 1)], [], TWO_CARDS, Limits(max_jobs=50, max_passes=3), passes)
    assert [d.job_id for d, _ in result.start] == [0, 50]  # once the card is free, it starts first


def test_cpu_jobs_are_not_held_back_by_a_waiting_gpu_job() -> None:
    holding = [Holding(job_id=100, service="sd", gpu_ids=("0", "1"), gpu_memory=None)]
    result = plan([gpu_job(1, 4), Demand(job_id=2, service="ocr")], holding, TWO_CARDS,
                  Limits(max_jobs=10, max_passes=0), {})
    assert [d.job_id for d, _ in result.start] == [2]


def test_never_fits_says_why() -> None:
    assert never_fits(gpu_job(1, 30), TWO_CARDS) == (
        "it needs 30.0 GiB of GPU memory per card and the largest card has 24.0 GiB")
    assert never_fits(gpu_job(1, 4, gpus=3), TWO_CARDS) == "it needs 3 GPU(s) and this server has 2"
    assert never_fits(gpu_job(1, 20), TWO_CARDS) is None
    assert never_fits(Demand(job_id=1, service="ocr"), []) is None


def test_a_long_random_workload_never_oversubscribes_and_starves_nobody() -> None:
    rng = random.Random(7)
    limits = Limits(max_jobs=6, per_service={"sd": 2}, max_passes=4)
    waiting: list[Demand] = []
    running: dict[int, tuple[Holding, int]] = {}
    arrived: dict[int, int] = {}
    waited: dict[int, int] = {}
    passes: dict[int, int] = {}
    next_id = 1
    for tick in range(3000):
        for job_id in [j for j, (_, end) in running.items() if end <= tick]:
            del running[job_id]
        if tick < 2500 and rng.random() < 0.6:
            size = rng.choice([None, 2, 4, 8, 12, 20, 24])
            service = rng.choice(["whisper", "sd", "blip"])
            waiting.append(gpu_job(next_id, size, service=service) if rng.random() < 0.8
                           else Demand(job_id=next_id, service="ocr"))
            arrived[next_id] = tick
            next_id += 1
        result = plan(waiting, [h for h, _ in running.values()], TWO_CARDS, limits, passes)
        passes = result.passes
        for demand, ids in result.start:
            running[demand.job_id] = (Holding(job_id=demand.job_id, service=demand.service, gpu_ids=tuple(ids),
                                              gpu_memory=demand.gpu_memory), tick + rng.randint(1, 8))
            waited[demand.job_id] = tick - arrived[demand.job_id]
        started = {d.job_id for d, _ in result.start}
        waiting = [d for d in waiting if d.job_id not in started]
        # Invariants, every tick: no card holds more than it has; whole-card jobs are alone.
        held: Counter[str] = Counter()
        for holding, _ in running.values():
            for gpu in holding.gpu_ids:
                held[gpu] += holding.gpu_memory if holding.gpu_memory is not None else 10**15
        for card in TWO_CARDS:
            whole = [h for h, _ in running.values() if card.id in h.gpu_ids and h.gpu_memory is None]
            assert held[card.id] <= card.total or (len(whole) == 1 and held[card.id] == 10**15)
        assert len(running) <= limits.max_jobs
        assert sum(1 for h, _ in running.values() if h.service == "sd") <= 2
    assert not waiting, f"{len(waiting)} jobs never started"
    assert max(waited.values()) < 400, "a job waited far longer than the rest: starvation"
