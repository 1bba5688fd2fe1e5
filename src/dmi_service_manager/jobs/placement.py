"""Which waiting jobs may start now, and on which GPUs. Pure logic: no I/O, no clock.

Order is first come, first served, with bounded passing: a job that fits may start ahead of an older
job that is waiting (say, for a card with more free memory), but each time that happens the older
job's pass count goes up, and once it reaches QUEUE_MAX_PASSES nothing behind it may start until it
has. The waiting job therefore starts as soon as running jobs free what it needs: never starved.

GPU memory is reserved per job from the service's `gpu_memory` estimate; a GPU service without an
estimate takes whole cards. A card never holds more reservations than its memory, so concurrent
jobs never share a card beyond what it has.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..config import Config
from .model import Job, Kind

GIB = 1024**3


class _Measured(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def total(self) -> int: ...

    @property
    def free(self) -> int | None: ...


@dataclass(frozen=True)
class Card:
    id: str
    total: int
    free: int | None = None  # measured; None when nothing measures it

    @classmethod
    def of(cls, card: _Measured) -> Card:
        """A card of the inventory (NVML, declared, nvidia-smi) as placement sees it."""
        return cls(id=card.id, total=card.total, free=card.free)


@dataclass(frozen=True)
class Demand:
    """What one job needs to start."""

    job_id: int
    service: str
    uses_gpu: bool = False
    gpus: int = 1
    gpu_memory: int | None = None  # None: whole cards


def service_demand(config: Config, service: str, *, job_id: int = 0, gpu_memory: int | None = None) -> Demand:
    """What a job of a configured service needs; `gpu_memory` is the job's own estimate, if any."""
    settings = config.docker_endpoints[service]
    return Demand(job_id=job_id, service=service, uses_gpu=config.service_uses_gpu(service), gpus=settings.gpus,
                  gpu_memory=gpu_memory if gpu_memory is not None else settings.gpu_memory)


def uses_gpu(job: Job, config: Config) -> bool:
    if job.kind is Kind.TES:
        return config.gpu_enabled and job.gpus > 0
    return job.service in config.docker_endpoints and config.service_uses_gpu(job.service or "")


def demand_of(job: Job, config: Config) -> Demand:
    """What a stored job needs: a 4CAT job from its service, a TES task from its own resources."""
    if job.kind is Kind.TES:
        return Demand(job_id=job.id, service=job.service or "tes", uses_gpu=uses_gpu(job, config),
                      gpus=max(job.gpus, 1), gpu_memory=job.gpu_memory)
    return service_demand(config, job.service or "", job_id=job.id, gpu_memory=job.gpu_memory)


@dataclass(frozen=True)
class Holding:
    """What one running (or starting) job holds."""

    job_id: int
    service: str
    gpu_ids: tuple[str, ...] = ()
    gpu_memory: int | None = None

    @classmethod
    def of(cls, job: Job) -> Holding:
        return cls(job_id=job.id, service=job.service or "", gpu_ids=tuple(job.gpu_ids), gpu_memory=job.gpu_memory)


@dataclass(frozen=True)
class Limits:
    max_jobs: int
    per_service: dict[str, int] = field(default_factory=dict)
    max_passes: int = 5


@dataclass
class Plan:
    start: list[tuple[Demand, list[str]]] = field(default_factory=list)
    waiting: dict[int, str] = field(default_factory=dict)  # job id -> why it waits
    passes: dict[int, int] = field(default_factory=dict)  # updated pass counts


def fmt_bytes(value: int) -> str:
    return f"{value / GIB:.1f} GiB"


def never_fits(demand: Demand, cards: Sequence[Card]) -> str | None:
    """Why this job could not start even on an idle server, or None."""
    if not demand.uses_gpu:
        return None
    if len(cards) < demand.gpus:
        return f"it needs {demand.gpus} GPU(s) and this server has {len(cards)}"
    if demand.gpu_memory is not None:
        large = sorted((c.total for c in cards), reverse=True)[: demand.gpus]
        if large[-1] < demand.gpu_memory:
            return (f"it needs {fmt_bytes(demand.gpu_memory)} of GPU memory per card and the largest card"
                    f"{'s have' if demand.gpus > 1 else ' has'} {fmt_bytes(large[-1])}")
    return None


class _Cards:
    def __init__(self, cards: Sequence[Card], holdings: Sequence[Holding]) -> None:
        self.cards = {c.id: c for c in cards}
        self.reserved: Counter[str] = Counter()
        self.exclusive: set[str] = set()
        for holding in holdings:
            for gpu in holding.gpu_ids:
                self._reserve(gpu, holding.gpu_memory)

    def _reserve(self, gpu: str, memory: int | None) -> None:
        if memory is None:
            self.exclusive.add(gpu)
        else:
            self.reserved[gpu] += memory

    def available(self, card: Card) -> int:
        if card.id in self.exclusive:
            return 0
        room = card.total - self.reserved[card.id]
        if self.reserved[card.id] == 0 and card.free is not None:
            room = min(room, card.free)  # something outside this server uses the card
        return max(room, 0)

    def place(self, demand: Demand) -> list[str] | None:
        fitting = []
        for card in self.cards.values():
            room = self.available(card)
            if demand.gpu_memory is None:
                if self.reserved[card.id] == 0 and card.id not in self.exclusive and room > 0:
                    fitting.append((card.total, card.id))
            elif room >= demand.gpu_memory:
                fitting.append((room - demand.gpu_memory, card.id))  # best fit: least left over
        if len(fitting) < demand.gpus:
            return None
        chosen = [card_id for _, card_id in sorted(fitting, key=lambda f: (f[0], numeric_id(f[1])))[: demand.gpus]]
        for gpu in chosen:
            self._reserve(gpu, demand.gpu_memory)
        return chosen

    def most_room(self) -> int:
        return max((self.available(c) for c in self.cards.values()), default=0)


def reserved(holdings: Sequence[Holding], cards: Sequence[Card]) -> dict[str, int]:
    """Bytes each card holds for running jobs; a whole-card job holds all of its card."""
    held = _Cards(cards, holdings)
    return {c.id: c.total if c.id in held.exclusive else held.reserved[c.id] for c in cards}


def numeric_id(card_id: str) -> tuple[int, str]:
    return (int(card_id), "") if card_id.isdigit() else (1 << 30, card_id)


def plan(
    waiting: Sequence[Demand],
    holdings: Sequence[Holding],
    cards: Sequence[Card],
    limits: Limits,
    passes: dict[int, int],
    foreign: Sequence[Holding] = (),
) -> Plan:
    """Decide what starts now. `waiting` is in arrival order; `passes` is what earlier plans counted;
    `foreign` is what containers that this server did not start hold on the GPUs.

    Only GPU jobs pass GPU jobs: a CPU job takes no GPU memory, so it may start beside a job waiting
    for a card without delaying it; and a job held back by its own service's `max_concurrent` is not
    delayed by another service's job either.
    """
    result = Plan(passes=dict(passes))
    running = len(holdings)
    per_service = Counter(h.service for h in holdings)
    gpus = _Cards(cards, [*holdings, *foreign])  # containers we did not start hold GPU memory, not job slots
    waiting_for_gpu: list[int] = []  # older GPU jobs that could not start in this round
    barrier: int | None = None  # a GPU job passed too often: no GPU job behind it starts

    for demand in waiting:
        reason = None
        placed: list[str] = []
        service_max = limits.per_service.get(demand.service)
        if running >= limits.max_jobs:
            reason = f"all {limits.max_jobs} job slots are in use"
        elif service_max is not None and per_service[demand.service] >= service_max:
            reason = f"{demand.service} already runs its maximum of {service_max} job(s)"
        elif demand.uses_gpu and barrier is not None:
            reason = f"waiting behind job {barrier}, which needs a GPU and has been passed often enough"
        elif demand.uses_gpu:
            found = gpus.place(demand)
            if found is None:
                need = "a free GPU" if demand.gpu_memory is None else f"{fmt_bytes(demand.gpu_memory)} of GPU memory"
                reason = f"waiting for {need} (most free on one card now: {fmt_bytes(gpus.most_room())})"
                waiting_for_gpu.append(demand.job_id)
                if result.passes.get(demand.job_id, 0) >= limits.max_passes:
                    barrier = demand.job_id
            else:
                placed = found
        if reason is not None:
            result.waiting[demand.job_id] = reason
            continue
        result.start.append((demand, placed))
        running += 1
        per_service[demand.service] += 1
        if demand.uses_gpu:
            for older in waiting_for_gpu:
                result.passes[older] = result.passes.get(older, 0) + 1
    return result
