"""SecAgg+ rounds in one process: the server's workflow and the sites' mod talk through an in-memory grid.

The real thing (SuperLink, simulation runtime) is exercised by tests/test_privacy_simulation.py; here every
message of the protocol is delivered by hand, so the numbers can be checked exactly.
"""
import copy

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from client.secagg import is_secure_round, secure_aggregation
from server.secagg import secure_round


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages take their run id from the process's task identity, which a ServerApp process has set."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class InMemoryGrid:
    """The part of Flower's Grid that SecAggPlusWorkflow uses, delivering each message to a site's mod."""

    class _Run:
        run_id = 1

    run = _Run()

    def __init__(self, sites: dict[int, callable]):
        self.sites = sites                                  # node id -> train_content(content, context)
        self.contexts = {node: Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})
                         for node in sites}
        self.sent: list[Message] = []                       # what the sites sent back, for inspection

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            message = copy.deepcopy(message)   # on the wire each site gets its own copy (the mod edits its content)
            mod = secure_aggregation(self.sites[node])
            reply = mod(message, self.contexts[node], lambda m, c: pytest.fail("a SecAgg+ message reached the app"))
            reply.metadata.__dict__["_src_node_id"] = node
            self.sent.append(reply)
            replies.append(reply)
        return replies


def site_training(new_params: dict, examples: int, name: str):
    """A site that 'trains' to `new_params` (checking it was given the global ones)."""

    def train_content(content: RecordDict, context: Context):
        assert "run_name" in content["config"]             # the round config came through the legacy form
        return RecordDict({"arrays": ArrayRecord({k: v for k, v in _arrays(new_params).items()}),
                           "metrics": MetricRecord({"loss": float(examples), "examples": float(examples)}),
                           "site": ConfigRecord({"name": name})})

    return train_content


def _arrays(params):
    from flwr.app import Array

    return {k: Array(np.ascontiguousarray(v)) for k, v in params.items()}


def random_params(rng, scale=1.0):
    return {"encoder.weight": (scale * rng.standard_normal((6, 5))).astype(np.float32),
            "encoder.bias": (scale * rng.standard_normal(6)).astype(np.float32),
            "bn.num_batches_tracked": np.array(7, dtype=np.int64)}


SECAGG = {"num_shares": 3, "reconstruction_threshold": 2, "clipping_range": 8.0, "quantization_range": 4194304,
          "max_weight": 1000}
CONFIG = {"run_name": "r", "round": 1, "lr": 1e-3}


def test_server_gets_the_example_weighted_mean_change_and_each_sites_metrics():
    rng = np.random.default_rng(0)
    global_params = random_params(rng)
    examples = {11: 100, 22: 300, 33: 600}
    new = {node: {k: (v + 0.01 * rng.standard_normal(v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v + 3
                  for k, v in global_params.items()} for node in examples}
    grid = InMemoryGrid({node: site_training(new[node], n, f"site_{node}") for node, n in examples.items()})

    result = secure_round(grid, list(examples), global_params, 1, CONFIG, SECAGG, timeout_s=10)

    total = sum(examples.values())
    for name in ("encoder.weight", "encoder.bias"):
        expected = sum(n * (new[node][name].astype(np.float64) - global_params[name]) for node, n in examples.items())
        np.testing.assert_allclose(result.mean_delta[name], expected / total, atol=2e-4)
    assert "bn.num_batches_tracked" not in result.mean_delta     # integer counters stay out of the sum
    assert sorted((node, n) for node, n, _ in result.sites) == sorted(examples.items())
    assert {m["site"] for _, _, m in result.sites} == {"site_11", "site_22", "site_33"}
    assert result.failures == 0


def test_no_site_sends_its_parameters_in_the_clear():
    rng = np.random.default_rng(1)
    global_params = random_params(rng)
    new = {node: {k: v + np.float32(0.5) if v.dtype.kind == "f" else v for k, v in global_params.items()}
           for node in (1, 2)}
    grid = InMemoryGrid({node: site_training(new[node], 10, f"s{node}") for node in new})
    secure_round(grid, [1, 2], global_params, 1, CONFIG, SECAGG, timeout_s=10)

    plain = {v.astype(np.float32).tobytes() for p in new.values() for v in p.values()}
    for reply in grid.sent:
        for record in reply.content.array_records.values():
            assert len(record) == 0, "arrays leave the site only masked"
        for record in reply.content.config_records.values():
            for value in record.values():
                for item in value if isinstance(value, list) else [value]:
                    if isinstance(item, bytes):
                        assert not any(p in item for p in plain if len(p) > 16)


def test_a_site_that_refuses_drops_out_and_the_others_are_still_averaged():
    rng = np.random.default_rng(2)
    global_params = random_params(rng)
    new = {node: {k: v + np.float32(0.1 * node) if v.dtype.kind == "f" else v for k, v in global_params.items()}
           for node in (1, 2, 3)}
    sites = {node: site_training(new[node], 50, f"s{node}") for node in (1, 2)}
    sites[3] = lambda content, context: Error(4002, "site s3 privacy budget: over max_epsilon")
    grid = InMemoryGrid(sites)

    def deliver(messages, *, timeout=None):        # Flower turns an exception in a ClientApp into an error reply
        replies = []
        for message in messages:
            try:
                replies += InMemoryGrid.send_and_receive(grid, [message])
            except Exception as err:
                reply = Message(Error(0, str(err)), reply_to=message)
                reply.metadata.__dict__["_src_node_id"] = message.metadata.dst_node_id
                replies.append(reply)
        return replies

    grid.send_and_receive = deliver
    result = secure_round(grid, [1, 2, 3], global_params, 1, CONFIG, SECAGG, timeout_s=10)
    assert sorted(node for node, _, _ in result.sites) == [1, 2]
    np.testing.assert_allclose(result.mean_delta["encoder.bias"], 0.15, atol=1e-4)   # mean of 0.1 and 0.2
    assert result.failures == 1


def test_a_site_above_max_weight_refuses_by_name():
    from client.secagg import SecureRoundRefused, masked_change

    reply = RecordDict({"arrays": ArrayRecord(_arrays({"w": np.ones(2, np.float32)})),
                        "metrics": MetricRecord({"examples": 5000.0}), "site": ConfigRecord({"name": "big"})})
    with pytest.raises(SecureRoundRefused, match="privacy.secagg.max_weight"):
        masked_change({"w": np.zeros(2, np.float32)}, reply, ["w"], max_weight=1000)


def test_ordinary_rounds_pass_the_mod_untouched():
    message = Message(RecordDict({"config": ConfigRecord({"run": "r"})}), dst_node_id=5, message_type="train")
    assert not is_secure_round(message)
    seen = []
    secure_aggregation(lambda c, x: None)(message, None, lambda m, c: seen.append(m) or "reply")
    assert seen == [message]
