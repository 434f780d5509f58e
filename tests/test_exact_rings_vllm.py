"""Through vLLM on the CPU: the model runner reports each step's request order, and every running
request holds its own ring of exact copies (vllm_glue/ring_rows.py) for its lifetime."""
import pytest

pytestmark = pytest.mark.slow


def _ring_state(worker):
    from vllm_turboquant.vllm_glue.ring_rows import current_engine_rings, step_request_order

    rings = current_engine_rings()
    return (dict(rings.assigner._owner), step_request_order()[1],
            rings.ring_of_row[: len(step_request_order()[1] or [])].tolist())


def test_each_request_holds_its_own_ring_while_it_runs():
    pytest.importorskip("vllm")
    from vllm import SamplingParams

    from .vllm_support import engine

    seen = []
    with engine("turboquant_3.5_mse") as llm:
        # three requests that finish at different steps: vLLM's batch rows move when one ends
        prompts = ["The capital of France is", "Once upon a time", "def fib(n):"]
        params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (3, 9, 6)]
        outs = llm.generate(prompts, params)
        seen.append(llm.collective_rpc(_ring_state)[0])
        owners, last_order, last_rings = seen[0]
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 9, 6]
    mine = {r: ring for r, ring in owners.items() if not r.startswith("_turboquant")}
    assert len(mine) == 3 and len(set(mine.values())) == 3  # one ring each, none shared
    assert last_order and len(last_order) == 1  # the last step ran the longest request alone
    assert last_rings == [owners[last_order[0]]]  # ...in the ring it held from its first step


def test_requests_beyond_the_rings_are_served_from_pages(monkeypatch):
    pytest.importorskip("vllm")
    from vllm import SamplingParams

    from .vllm_support import engine

    monkeypatch.setenv("TURBOQUANT_EXACT_ROWS", "2")  # fewer rings than running requests
    with engine("turboquant_3.5_mse", max_num_seqs=4) as llm:
        params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
        outs = llm.generate(["One", "Two", "Three", "Four"], params)
        owners, _, rings = llm.collective_rpc(_ring_state)[0]
    assert all(len(o.outputs[0].token_ids) == 5 for o in outs)
    assert len(set(owners.values())) <= 2 and set(owners.values()) <= {0, 1}
    assert -1 in rings or len(rings) <= 2  # a full step had requests without a ring
