"""The site is the authority over its privacy and its disk: crafted rounds from a hostile coordinator go through
the ClientApp's real entry point (`client.app.train_content`, and the `audit_outgoing` mod) and are refused before
any data is read; a malformed site file is refused once, by `load_site`, with a message naming what is wrong.

A refused round builds no model and opens no catalog, so these tests take seconds. A site here has an empty data
folder: a round that got past the checks would fail on it (or on its fingerprints), never pass silently.
"""
import functools
import json
import math
from pathlib import Path

import pytest
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict

from client.app import (FINGERPRINT_MISMATCH, POLICY_REFUSED, ROUND_CONFIG_REFUSED, audit_outgoing,
                        train_content)
from client.policy import PolicyRefused, accepted_overrides, enforce_policy
from client.site import SiteConfigError, load_site
from server.rounds import round_config
from shared_models.config import compose

BASE = "model=tiny federation.rounds=2 federation.local_steps=1 train.batch_size=2"
OPEN = {"require": []}   # a site that also takes rounds without DP: what is refused here is not the policy


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages take their run id from the process's task identity, which a Flower process has set."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def site_document(tmp_path: Path, **fields) -> dict:
    (tmp_path / "data").mkdir(exist_ok=True)
    return {"name": "A", "data": {"root": str(tmp_path / "data"), "layout": "manifest", "index": False},
            "state_dir": str(tmp_path / "state"), "catalog": str(tmp_path / "state" / "catalog.sqlite"),
            "ledger": str(tmp_path / "state" / "ledger.sqlite"), "superlink": "127.0.0.1:9092",
            "root_certificates": "ca.crt", "node_private_key": "key", "device": "cpu", "threads": 1,
            "public_patient_count": 100, "privacy": {"max_epsilon": 8.0, "max_delta": 1e-5},
            "policy": {"require": ["dpsgd"], "min_noise_multiplier": 0.5, "accepted_models": ["tiny", "tiny_cnn"],
                       "accepted_objectives": None}, **fields}


def write_site(tmp_path: Path, **fields) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(site_document(tmp_path, **fields)))
    return path


def context(site_path: Path, overrides: str) -> Context:
    return Context(run_id=1, node_id=7, node_config={"site-file": str(site_path)}, state=RecordDict(),
                   run_config={"overrides": overrides})


@functools.lru_cache(maxsize=None)
def server_round_config(overrides: str) -> dict:
    return round_config(compose(overrides.split()), 1, "r", {})


def crafted_round(overrides: str, run: str = "r", **changes) -> RecordDict:
    """A round message as the ServerApp builds it for `overrides`, with `changes` to its config record."""
    config = dict(server_round_config(overrides), run_name=run, **changes)
    return RecordDict({"arrays": ArrayRecord({}), "config": ConfigRecord(config)})


def refused(reply, code: int, *words: str) -> str:
    assert isinstance(reply, Error), f"expected a refusal, got {reply}"
    assert reply.code == code, reply.reason
    for word in words:
        assert word in reply.reason, reply.reason
    return reply.reason


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


# ------------------------------------------------------------------------------------------------ policy
def test_privacy_none_on_a_dpsgd_site_is_refused_recorded_and_nothing_leaves(tmp_path, caplog):
    site = write_site(tmp_path)
    overrides = f"{BASE} privacy=none"
    ctx = context(site, overrides)
    message = Message(crafted_round(overrides), dst_node_id=7, message_type="train")
    reply = audit_outgoing(message, ctx, lambda m, c: Message(train_content(m.content, c), reply_to=m))
    assert reply.has_error() and not reply.has_content(), "no arrays and no metrics leave"
    assert reply.error.code == POLICY_REFUSED and "privacy=none" in reply.error.reason
    assert "requires DP-SGD" in reply.error.reason
    assert "site A refuses the round: privacy=none" in caplog.text   # the site's own log
    # recorded at the site: the audit of what left names the refusal; no ledger, no local state was written
    entries = [json.loads(line) for line in (tmp_path / "state" / "outgoing.jsonl").read_text().splitlines()]
    assert len(entries) == 1 and "requires DP-SGD" in entries[0]["error"] and entries[0]["records"] == {}
    assert not (tmp_path / "state" / "ledger.sqlite").exists()
    assert files_under(tmp_path / "state") == {"outgoing.jsonl"}


@pytest.mark.parametrize("loosening, words", [
    ("privacy=dpsgd privacy.dpsgd.noise_multiplier=0.1", ["noise_multiplier", "0.1", "floor"]),
    ("privacy=dpsgd privacy.dpsgd.target_epsilon=50", ["target_epsilon=50", "max_epsilon=8"]),
    ("privacy=dpsgd privacy.dpsgd.noise_multiplier=nan", ["noise_multiplier=nan", "finite number > 0"]),
    ("privacy=dpsgd privacy.dpsgd.target_epsilon=inf", ["target_epsilon=inf", "finite number > 0"]),
    ("privacy=dpsgd model=resnet50_bert", ["model=resnet50_bert", "accepts only models"]),
    ("privacy=dpsgd model.sharing.shared=[image_encoder.*,objectives.*]", ["model.sharing", "never send more"]),
])
def test_a_config_that_loosens_the_policy_is_refused(tmp_path, loosening, words):
    site = write_site(tmp_path)
    overrides = f"{BASE} {loosening}"
    refused(train_content(crafted_round(overrides), context(site, overrides)), POLICY_REFUSED, *words)
    assert not (tmp_path / "state").exists()


def test_a_target_epsilon_whose_noise_is_below_the_floor_is_refused(tmp_path):
    # target 8 over 2 rounds at rate 2/100 needs little noise: below a floor of 5, and refused before any data
    site = write_site(tmp_path, policy={"require": ["dpsgd"], "min_noise_multiplier": 5.0})
    overrides = f"{BASE} privacy=dpsgd privacy.dpsgd.target_epsilon=8"
    refused(train_content(crafted_round(overrides), context(site, overrides)), POLICY_REFUSED,
            "target_epsilon=8", "below", "min_noise_multiplier=5")


def test_a_site_requiring_secagg_refuses_a_round_in_the_clear(tmp_path):
    site = write_site(tmp_path, policy={"require": ["secagg"]})
    overrides = f"{BASE} privacy=secagg"
    refused(train_content(crafted_round(overrides), context(site, overrides)), POLICY_REFUSED, "SecAgg+", "in the clear")
    cfg = compose(overrides.split())
    enforce_policy(load_site(site, check_files=False), cfg, {"batch_size": 2}, secure=True)  # masked: accepted


def test_a_config_that_tightens_passes_the_policy_and_reaches_the_model(tmp_path):
    site = write_site(tmp_path)
    overrides = f"{BASE} privacy=dpsgd privacy.dpsgd.noise_multiplier=2.0 federation.privacy.max_epsilon=2.0 " \
                f"objective=g2d train.weight_decay=0.01 objective.lambdas.global=2.0 federation.output_dir=/srv/runs"
    # past every check, the round stops at the model fingerprints (the crafted round carries none), not the policy
    refused(train_content(crafted_round(overrides), context(site, overrides)), FINGERPRINT_MISMATCH, "refuses to train")
    assert not (tmp_path / "state" / "ledger.sqlite").exists()


# --------------------------------------------------------------------------------------------- overrides
@pytest.mark.parametrize("override", [
    "data.root=/etc", "data.catalog=/tmp/x.sqlite", "data=manifest", "cache_dir=/tmp/c", "federation.site_dir=/tmp",
    "train.resume_from=/tmp/ckpt", "train.threads=64", "model.text.name=bert-base-uncased", "hydra.run.dir=/tmp",
    "+federation.ledger=x", "~privacy.dpsgd", "objective.lambdas.tag=${oc.env:HOME}", "partition=iid",
    "objective.lambdas.tag=../x", "seed=1,2", "unknown_key=1", "model=../../x", "objective.lambdas=[1,",
])
def test_overrides_outside_the_allow_list_are_refused(tmp_path, override):
    site = write_site(tmp_path, policy=OPEN)
    overrides = f"{BASE} {override}"
    refused(train_content(crafted_round(BASE), context(site, overrides)), POLICY_REFUSED, repr(override))
    assert not (tmp_path / "state").exists()


def test_the_coordinators_own_folders_are_accepted_but_never_applied_at_the_site():
    kept = accepted_overrides(["model=tiny", "federation.output_dir=/srv/runs", "federation.registry=/srv/r.sqlite",
                               "federation.rounds=3", "privacy.dpsgd.noise_multiplier=2"])
    assert kept == ["model=tiny", "federation.rounds=3", "privacy.dpsgd.noise_multiplier=2"]
    # the simulation runtime's own keys: trusted on a virtual site, refused on a real one
    simulation = ["federation.site_dir=/tmp/run/sites", "partition=scanner", "~model.image.kwargs.depth"]
    assert accepted_overrides(simulation, simulated=True) == simulation
    with pytest.raises(PolicyRefused, match="federation.site_dir"):
        accepted_overrides(simulation)


def test_the_rounds_settings_reach_the_site_only_in_the_round_config(tmp_path):
    """The site's config from the run's overrides keeps no copy of the round's settings (steps, lr, seed, ...):
    a site can read them only from the round's config record, which it validates."""
    from client.app import run_config

    cfg = run_config(context(write_site(tmp_path, policy=OPEN), f"{BASE} train.lr=0.5 seed=7 train.weight_decay=0.25"))
    assert "federation" not in cfg and "seed" not in cfg and "lr" not in cfg.train and "batch_size" not in cfg.train
    assert cfg.model.name == "tiny" and cfg.train.weight_decay == 0.25   # what the round config does not carry arrives


def test_a_query_builds_the_initial_model_from_its_config_record(tmp_path):
    from client.app import query
    from client.federated import shared_arrays
    from shared_models.factory import create_model

    ctx = context(write_site(tmp_path, policy=OPEN), BASE)
    bare = query(Message(RecordDict(), dst_node_id=7, message_type="query"), ctx)
    assert bare.has_error() and bare.error.code == ROUND_CONFIG_REFUSED and "seed is missing" in bare.error.reason
    asked = RecordDict({"config": ConfigRecord({"seed": 3, "rounds": 2, "local_steps": 1})})
    reply = query(Message(asked, dst_node_id=7, message_type="query"), ctx)
    cfg = compose(BASE.split())
    expected = shared_arrays(create_model(cfg, seed=3), cfg)
    other_seed = shared_arrays(create_model(cfg, seed=4), cfg)
    got = {name: array.numpy() for name, array in reply.content["arrays"].items()}
    assert set(got) == set(expected) and all((got[k] == expected[k]).all() for k in expected)
    assert any((got[k] != other_seed[k]).any() for k in expected)


def test_a_retired_key_in_the_overrides_is_refused_naming_the_key_to_use(tmp_path):
    site = write_site(tmp_path, policy=OPEN)
    overrides = f"{BASE} federation.validate_updates=true"
    refused(train_content(crafted_round(BASE), context(site, overrides)), POLICY_REFUSED,
            "federation.validate_updates", "federation.update_norm_action")


# ---------------------------------------------------------------------------------------------- run name
@pytest.mark.parametrize("run", ["../../outside", "/abs/path", "..", "a" * 65, "x/y", "name with space", ""])
def test_a_run_name_that_leaves_state_dir_is_refused_and_nothing_is_written_outside(tmp_path, run):
    site = write_site(tmp_path, policy=OPEN)
    refused(train_content(crafted_round(BASE, run=run), context(site, BASE)), ROUND_CONFIG_REFUSED,
            "run", "a run name must be 1-64 letters")
    assert files_under(tmp_path) == {"data", "site.yaml"} and not Path("/abs/path").exists()


def test_local_state_that_resolves_outside_state_dir_is_refused(tmp_path):
    from client.federated import _local_file

    state, outside = tmp_path / "state", tmp_path / "outside"
    state.mkdir()
    outside.mkdir()
    assert _local_file({"state_dir": str(state)}, "r") == (state / "runs" / "r" / "local.safetensors").resolve()
    (state / "runs").symlink_to(outside)   # a link planted in state_dir: the site still never writes through it
    with pytest.raises(PolicyRefused, match="outside this site's state_dir"):
        _local_file({"state_dir": str(state)}, "r")


def test_a_run_name_override_is_checked_at_the_site(tmp_path):
    site = write_site(tmp_path, policy=OPEN)
    for override in ("federation.run_name=..", "federation.run_name=" + "b" * 65):
        refused(train_content(crafted_round(BASE), context(site, f"{BASE} {override}")), POLICY_REFUSED,
                "federation.run_name")


# ------------------------------------------------------------------------------------------ round numbers
@pytest.mark.parametrize("key, value", [
    ("lr", math.nan), ("lr", math.inf), ("lr", -1e-3), ("lr", 0.0), ("batch_size", -1), ("batch_size", 100_000),
    ("local_steps", 0), ("rounds", 0), ("round", 3), ("seed", -5), ("proximal_mu", math.nan),
    ("transfer_dtype", "int8"), ("batch_size", 2.5),
])
def test_the_rounds_numbers_are_validated_before_training(tmp_path, key, value):
    site = write_site(tmp_path, policy=OPEN)
    reason = refused(train_content(crafted_round(BASE, **{key: value}), context(site, BASE)), ROUND_CONFIG_REFUSED, key)
    assert "refused by this site" in reason
    assert not (tmp_path / "state").exists(), "a refused round writes nothing"


def test_a_round_message_without_its_records_is_refused(tmp_path):
    site = write_site(tmp_path, policy=OPEN)
    refused(train_content(RecordDict({"arrays": ArrayRecord({})}), context(site, BASE)), ROUND_CONFIG_REFUSED, "config")


@pytest.mark.parametrize("override", ["train.min_lr_ratio=5", "train.grad_clip=-1", "seed=99999999999"])
def test_train_settings_from_the_overrides_are_validated(tmp_path, override):
    # the round as the ServerApp builds it for these overrides: `train.*` reaches the site through the overrides,
    # the seed through the round's config record (its one source at the site)
    site = write_site(tmp_path, policy=OPEN)
    key = override.split("=")[0]
    overrides = f"{BASE} {override}"
    refused(train_content(crafted_round(overrides), context(site, overrides)), ROUND_CONFIG_REFUSED, key)
    assert not (tmp_path / "state").exists()


# --------------------------------------------------------------------------------------------- site file
@pytest.mark.parametrize("fields, words", [
    ({"supernode_port": "abc"}, ["supernode_port must be an integer 1..65535", "'abc'"]),
    ({"supernode_port": 70000}, ["supernode_port"]),
    ({"threads": "many"}, ["threads must be an integer >= 1", "'many'"]),
    ({"threads": 0}, ["threads"]),
    ({"data": "/data/site_a"}, ["data must be a mapping with root and layout"]),
    ({"data": {"root": "/x", "layout": "dicomdir"}}, ["data.layout must be one of", "mimic_cxr"]),
    ({"device": "gpu"}, ["device must be auto, cpu, cuda or cuda:N"]),
    ({"max_retries": -1}, ["max_retries"]),
    ({"restart_delays_s": "often"}, ["restart_delays_s"]),
    ({"superlink": "coordinator"}, ["superlink must be host:port"]),
    ({"polcy": {"require": ["dpsgd"]}}, ["unknown key(s) ['polcy']"]),
    ({"policy": {"require": ["dp"]}}, ["policy.require must be a list drawn from", "dpsgd"]),
    ({"policy": {"min_noise_multiplier": -1}}, ["min_noise_multiplier"]),
    ({"privacy": {"max_epsilon": "inf", "max_delta": 1e-5}}, ["max_epsilon"]),
])
def test_a_malformed_site_file_is_refused_with_what_is_wrong(tmp_path, fields, words):
    path = write_site(tmp_path, **fields)
    with pytest.raises(SiteConfigError) as raised:
        load_site(path, check_files=False)
    assert str(path) in str(raised.value)
    for word in words:
        assert word in str(raised.value)


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text("name: A\ndata:\n  root: /x\n  layout: [manifest\nstate_dir: /s\n")
    with pytest.raises(SiteConfigError, match=r"site.yaml, line \d+ column \d+: not valid YAML"):
        load_site(path, check_files=False)
    path.write_text("- just\n- a list\n")
    with pytest.raises(SiteConfigError, match="a site file is a mapping"):
        load_site(path, check_files=False)


def test_the_first_start_creates_state_dir_and_the_default_catalogs_folder(tmp_path):
    (tmp_path / "ca.crt").write_text("ca")
    (tmp_path / "key").write_text("key")
    document = site_document(tmp_path, root_certificates=str(tmp_path / "ca.crt"), node_private_key=str(tmp_path / "key"),
                             state_dir=str(tmp_path / "fresh" / "state"), catalog=None, device="auto")
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(document))
    site = load_site(tmp_path / "site.yaml")
    assert (tmp_path / "fresh" / "state").is_dir() and site["device"] == "auto"
    assert site["policy"]["require"] == ["dpsgd"] and site["policy"]["accepted_models"] == ["tiny", "tiny_cnn"]


def test_a_site_file_without_a_policy_requires_dp(tmp_path):
    document = site_document(tmp_path)
    del document["policy"]
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(document))
    assert load_site(tmp_path / "site.yaml", check_files=False)["policy"]["require"] == ["dpsgd"]
    refused(train_content(crafted_round(BASE), context(tmp_path / "site.yaml", BASE)), POLICY_REFUSED, "requires DP-SGD")


def test_the_example_site_files_are_valid_and_require_dp():
    for name in ("A", "B"):
        site = load_site(Path(__file__).resolve().parents[1] / "configs" / "site" / f"{name}.yaml", check_files=False)
        assert site["device"] == "auto" and site["policy"]["require"] == ["dpsgd"]
