"""A simulated run's configuration is parsed once per process, not once per message."""

from __future__ import annotations

from corolla.client import local
from corolla.config import RunConfig
from corolla.launch.local_grid import simulated_contexts


def test_two_messages_of_one_run_parse_its_configuration_once(monkeypatch):
    calls = []
    parse = RunConfig.from_mapping

    def counting(values):
        calls.append(dict(values))
        return parse(values)

    monkeypatch.setattr(RunConfig, "from_mapping", staticmethod(counting))
    monkeypatch.setattr(local, "_trainer", lambda *args: args)  # the trainer's inputs, no model
    local._parsed.cache_clear()
    values = RunConfig(ranks="4,8", num_rounds=3).to_mapping()
    first, second = simulated_contexts(2, values).values()
    a, b, again = local.trainer_for(first), local.trainer_for(second), local.trainer_for(first)
    assert len(calls) == 1
    assert (a[5], b[5]) == (4, 8) and again == a  # each node still gets its own rank
    local.trainer_for(next(iter(simulated_contexts(1, {**values, "num-rounds": 4}).values())))
    assert len(calls) == 2  # another run's configuration is parsed afresh
    local._parsed.cache_clear()
