"""Poison prompts: a schema that would crash the grammar compiler is refused by its bound and
never takes the node down; a turn that crashed the node again and again is set aside."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.constraints import SCHEMA_MAX_DEPTH, schema_bounds_problem, schema_source
from actors.schema_worker import SchemaWorker
from node.client import InfernodeClient
from node.nats_server import EmbeddedNats
from schemas.chat import SamplingParams
from schemas.errors import InferError
from tests.test_durability import NodeProcess

GREEDY = SamplingParams(temperature=0.0)


def ref_chain(n: int) -> dict[str, object]:
    """A schema whose root reaches a string through ``n`` chained ``$ref``s (~35 bytes each:
    2,500 is ~88 KiB, well inside a prompt)."""
    defs: dict[str, object] = {f"a{i}": {"$ref": f"#/$defs/a{i + 1}"} for i in range(n)}
    defs[f"a{n}"] = {"type": "string"}
    return {"$ref": "#/$defs/a0", "$defs": defs}


def json_format(schema: dict[str, object]) -> dict[str, object]:
    return {"type": "json_schema", "json_schema": {"name": "chain", "schema": schema}}


def test_schema_bounds_name_the_depth_limit_and_let_a_recursive_schema_pass():
    """A long $ref chain is past the depth bound (named); a self-referencing tree is not."""
    assert f"more than {SCHEMA_MAX_DEPTH} levels" in schema_bounds_problem(ref_chain(2500))
    assert schema_bounds_problem(ref_chain(SCHEMA_MAX_DEPTH // 2)) == ""
    tree = {"$ref": "#/$defs/n", "$defs": {"n": {"type": "object", "properties": {
        "kids": {"type": "array", "items": {"$ref": "#/$defs/n"}}}}}}
    assert schema_bounds_problem(tree) == ""


async def test_a_schema_that_crashes_the_compiler_is_a_refusal_and_the_next_one_compiles():
    """Past the bounds on purpose, the compiler's native crash kills only its own process:
    the question is answered with the crash and the next schema compiles in a fresh one."""
    worker = SchemaWorker()
    try:
        crashed = await worker.problem(schema_source(ref_chain(5000)))
        assert "crashed" in crashed and worker.restarts == 1
        assert await worker.problem(schema_source({"type": "object"})) == ""
    finally:
        await worker.close()


@pytest.mark.timeout(180)
async def test_a_node_refuses_a_ref_chain_schema_naming_the_limit_and_still_serves(
    nats_server: EmbeddedNats, tiny_model: Path, tmp_path: Path
):
    """Given `infernode up`, a response_format chaining 2,500 $refs is a 400 naming the depth
    limit, and the same node answers the next prompt (it used to die of a stack overflow)."""
    node = await NodeProcess.up(nats_server.url, tmp_path / "node", tiny_model)
    try:
        async with InfernodeClient(nats_server.url) as client:
            with pytest.raises(InferError) as refused:
                await client.complete("deep", "hi", response_format=json_format(ref_chain(2500)),
                                      max_tokens=4, timeout=60)
            assert refused.value.status == 400
            assert f"more than {SCHEMA_MAX_DEPTH} levels" in refused.value.message
            served = await client.complete("deep", "still there?", sampling=GREEDY,
                                           max_tokens=4, timeout=60)
        assert served.commit is not None and node.proc.returncode is None
    finally:
        await node.terminate()
