"""Prometheus metrics by the book: promtool finds nothing, both doors report the same numbers."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from actors.bank_committer import BankCommitter
from node.client import InfernodeClient
from schemas.chat import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


async def _scrape(port: int) -> tuple[str, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    raw = (await asyncio.wait_for(reader.read(), 10)).decode()
    writer.close()
    head, _, body = raw.partition("\r\n\r\n")
    return head, body


async def _busy_node(make_node):  # type: ignore[no-untyped-def]
    """A node with a durable tier and one slot, after turns that evict and restore ("a" and
    "b" are declared one trust domain, so "b" may restore the prompt head "a" banked)."""
    node = await make_node(metrics_port=0, n_slots=1, bank_object_store=True,
                           bank_share_groups="pair=a,b")
    async with InfernodeClient(node.url) as c:
        for session in ("a", "b", "a"):
            await c.complete(session, f"hello from {session}", sampling=GREEDY, max_tokens=4)
    # Quiet means every snapshot is banked and written to the durable tier.
    await next(a for a in node.actors if isinstance(a, BankCommitter)).wait_handled(3)
    await asyncio.wrap_future(node.engine.bank.durable.flush())
    return node


async def test_scrape_passes_promtool_check_metrics_with_zero_findings(make_node):
    """Given a node that ran, evicted and restored turns, `promtool check metrics` finds nothing."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`)")
    node = await _busy_node(make_node)
    head, body = await _scrape(node.metrics_http.port)
    assert "Content-Type: text/plain; version=" in head
    check = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, text=True, timeout=30
    )
    assert (check.returncode, check.stdout + check.stderr) == (0, "")


async def test_every_family_has_help_and_latencies_are_histograms_in_seconds(make_node):
    """Each family has HELP; counters end in _total; every latency is a seconds histogram."""
    node = await _busy_node(make_node)
    _, body = await _scrape(node.metrics_http.port)
    families = {f.name: f for f in text_string_to_metric_families(body)}
    assert all(f.documentation for f in families.values())
    histograms = {n for n, f in families.items() if f.type == "histogram"}
    assert histograms == {
        "infernode_time_to_first_token_seconds", "infernode_prefill_seconds_per_token",
        "infernode_decode_seconds_per_token", "infernode_bank_restore_seconds",
        "infernode_queue_seconds", "infernode_bank_commit_seconds",
    }
    assert not [n for n in families if n.endswith("_ms") or "_ms_" in n]
    counts = {s.name: s.value for f in families.values() for s in f.samples}
    # "b" restored the prompt head "a" banked (shared prefix); "a" came back from the bank.
    assert counts["infernode_bank_restore_seconds_count"] == 2
    assert counts["infernode_bank_commit_seconds_count"] == 3


async def test_admin_metrics_reply_carries_exactly_the_scraped_numbers(make_node):
    """Given a quiet node, infer.admin.metrics and /metrics give the same samples and values."""
    node = await _busy_node(make_node)
    _, body = await _scrape(node.metrics_http.port)
    async with InfernodeClient(node.url) as c:
        reply = await c.metrics()
    scraped = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(body) for s in f.samples
    }
    replied = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in reply.families for s in f.samples
    }
    assert replied == scraped
    assert reply.quantile("infernode_time_to_first_token_seconds", 0.5) is not None
