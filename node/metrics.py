"""The node's Prometheus metrics: one collector reads the actors' own counters at scrape time.

Both doors serve these families: the HTTP endpoint (``--metrics-port``) renders them with
prometheus_client, and ``<prefix>.admin.metrics`` answers with the same families as a typed
message (``infernode metrics`` prints it), so the two can never disagree. The collector keeps
no numbers of its own: counts stay with the actor that counts them, latency histograms with
the engine and the bank committer. Each number has one name; ratios and sums of other
numbers are left to PromQL.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from actors.admission import Admission
from actors.bank_committer import BankCommitter
from actors.base import Actor
from actors.session.host import RunnerHost
from schemas.admin import MetricFamily, MetricSample, MetricsReply

if TYPE_CHECKING:
    from actors.engine.bank.store import BankStore
    from actors.engine.engine import SlotEngine

NS = "infernode_"


def counter(
    name: str, text: str, value: float | None = None, labels: Iterable[str] = ()
) -> CounterMetricFamily:
    """A counter family; prometheus_client adds the ``_total`` suffix to its sample."""
    return CounterMetricFamily(NS + name, text, value=value, labels=list(labels) or None)


def gauge(
    name: str, text: str, value: float | None = None, labels: Iterable[str] = ()
) -> GaugeMetricFamily:
    """A gauge family."""
    return GaugeMetricFamily(NS + name, text, value=value, labels=list(labels) or None)


class MetricSource(Protocol):
    """What the collector reads: the node's actors and its engine (the node itself)."""

    actors: list[Actor]
    engine: SlotEngine | None


class NodeMetrics(Collector):
    """Collects the node's families from its actors and engine on every scrape."""

    def __init__(self, node: MetricSource) -> None:
        self.node = node
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def describe(self) -> list[Metric]:
        """Nothing up front: the families depend on what the node runs (bank tiers, actors)."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Every family, read now."""
        yield from self._actors()
        engine = self.node.engine
        if engine is not None:
            yield from self._engine(engine)
            if engine.bank is not None:
                yield from self._bank(engine.bank)
        for actor in self.node.actors:
            if isinstance(actor, BankCommitter):
                yield from self._committer(actor)

    def reply(self) -> MetricsReply:
        """The families as the typed ``admin.metrics`` reply."""
        return MetricsReply(families=tuple(
            MetricFamily(
                name=m.name, kind=m.type, help=m.documentation,  # type: ignore[arg-type]
                samples=tuple(
                    MetricSample(name=s.name, labels=dict(s.labels), value=s.value)
                    for s in m.samples
                ),
            )
            for m in self.registry.collect()
        ))

    def _actors(self) -> Iterator[Metric]:
        errors = counter(
            "actor_errors", "Messages an actor failed to handle (answered with a typed error).",
            labels=["actor"],
        )
        for actor in self.node.actors:
            errors.add_metric([actor.name], actor.errors)
            if isinstance(actor, RunnerHost):
                yield gauge("sessions", "Sessions the node holds.", len(actor.runners))
            if isinstance(actor, Admission):
                yield counter("prompts_admitted", "Prompts recorded in their session's log.",
                              actor.admitted)
                yield counter("prompts_rejected", "Prompts refused with a typed error event.",
                              actor.rejected)
                yield counter("prompts_deferred",
                              "Admission attempts left in the intake stream to retry later.",
                              actor.deferred)
        yield errors

    def _engine(self, engine: SlotEngine) -> Iterator[Metric]:
        stats = engine.turn_stats
        totals = stats.counters()
        yield counter("turns", "Turns the engine finished.", totals["turns"])
        yield counter("prompt_tokens", "Prompt tokens of every turn, reused or evaluated.",
                      totals["prompt_tokens"])
        yield counter("cached_prompt_tokens",
                      "Prompt tokens reused from a slot or the bank instead of evaluated.",
                      totals["cached_tokens"])
        yield counter("slot_evictions", "Resident sessions moved out of a slot for another.",
                      totals["slot_evictions"])
        yield counter("speculative_proposed_tokens",
                      "Tokens proposed by n-gram lookup and verified in a decode batch.",
                      totals["proposed_tokens"])
        yield counter("speculative_accepted_tokens",
                      "Proposed tokens the sampler drew as proposed (kept in the reply).",
                      totals["accepted_tokens"])
        misses = counter("cache_misses", "Turns that reused less than their whole prompt.",
                         labels=["reason"])
        for reason, n in sorted(stats.misses_by_reason().items()):
            misses.add_metric([reason], n)
        yield misses
        yield gauge("slots", "Contexts sharing the model's weights.", len(engine.pool.slots))
        yield from _histograms(stats.histograms())

    def _bank(self, bank: BankStore) -> Iterator[Metric]:
        ram = bank.stats()
        entries = gauge("bank_entries", "KV snapshots held, by tier.", labels=["tier"])
        held = gauge("bank_bytes", "Bytes of KV snapshots held, by tier.", labels=["tier"])
        entries.add_metric(["ram"], ram["entries"])
        held.add_metric(["ram"], ram["bytes"])
        restores = counter("bank_restores", "Turns that restored a banked snapshot, by tier.",
                           labels=["tier"])
        restores.add_metric(["ram"], ram["hits"] - ram["durable_hits"])
        restores.add_metric(["durable"], ram["durable_hits"])
        yield gauge("bank_ram_capacity_bytes", "Host RAM the bank may hold.", ram["max_bytes"])
        yield counter("bank_evictions", "Snapshots dropped from host RAM to make room.",
                      ram["evictions"])
        if bank.durable is not None:
            durable = bank.durable.stats()
            entries.add_metric(["durable"], durable["entries"])
            held.add_metric(["durable"], durable["bytes"])
            yield counter("bank_durable_writes", "Snapshots written to the durable tier.",
                          durable["written"])
            yield counter("bank_durable_write_failures",
                          "Snapshots the durable tier failed to write.",
                          durable["write_failures"])
        yield from (entries, held, restores)

    def _committer(self, committer: BankCommitter) -> Iterator[Metric]:
        yield counter("bank_commit_requests", "Committed turns handed to the bank committer.",
                      committer.committed)
        yield counter("bank_snapshots_stored", "Committed turns whose KV snapshot was banked.",
                      committer.stored)
        yield counter("bank_stored_bytes", "Bytes of KV snapshots banked.",
                      committer.bytes_stored)
        dropped = counter("bank_snapshots_dropped",
                          "Committed turns whose snapshot was dropped (the record is kept).",
                          labels=["reason"])
        for reason, n in sorted(committer.dropped.items()):
            dropped.add_metric([reason], n)
        yield dropped
        yield from _histograms((committer.commit_seconds,))


def _histograms(histograms: Iterable[Histogram]) -> Iterator[Metric]:
    # A histogram's ``_created`` sample is its start time, not a measurement; leave it out.
    for histogram in histograms:
        for family in histogram.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family
