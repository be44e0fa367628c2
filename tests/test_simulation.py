"""`python -m simulations.run` end to end: 2 virtual sites, 2 rounds on a tiny phantom, the deployment's apps."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.registry import Registry
from simulations.flower import _alive, descendants

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.skipif(not (BIN / "flower-superlink").exists(), reason="flwr's entry points are not installed")


# One Ray actor runs the virtual sites one after another: each extra actor is another process importing torch,
# timm and transformers at start-up, which on 2 cores delays round 1 more than the sites' single steps take.
ONE_ACTOR = "client_resources.concurrent_sites=1"


@pytest.fixture(scope="module")
def simulation(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("simulation")
    run_dir = tmp / "run"
    command = [sys.executable, "-m", "simulations.run", f"hydra.run.dir={run_dir}", f"cache_dir={tmp / 'cache'}",
               "data.studies=40", "federation.sites=2", "federation.rounds=2", "federation.local_steps=1",
               "train.batch_size=4", "label_fraction=[1.0]", "client_resources.num_cpus=1", ONE_ACTOR,
               "probe.max_iter=20",
               "federation.strategy=fedavg",   # every site in every round (cyclic would ask one per round)
               "centralized_steps=all_sites",  # the baseline takes every site's steps (the default: one model's)
               "objective.schedule.stage2_step=1000", "objective.schedule.seg_start_step=200"]  # absolute: the notice
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=840)
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return run_dir, done.stdout


def test_summary_has_the_contract_keys(simulation):
    run_dir, stdout = simulation
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {"config", "sites", "rounds", "final", "wall_s", "bytes_sent", "epsilon"} <= set(summary)
    assert set(summary["final"]) == {"federated", "centralized", "random"}
    for result in summary["final"].values():
        assert 0.0 <= result["linear_probe"]["1.0"]["mean_auc"]["mean"] <= 1.0
    assert summary["bytes_sent"] > 0 and summary["wall_s"] > 0 and summary["epsilon"] == {}
    assert "| federated |" in stdout and "| random |" in stdout
    for name in ("report.md", "loss_per_site.png", "global_per_round.png", "final_auc.png", "sites.md"):
        assert (run_dir / name).is_file(), name


def test_summary_and_report_name_the_terms_the_schedule_never_reaches(simulation):
    run_dir, _ = simulation
    summary = json.loads((run_dir / "summary.json").read_text())
    # 2 rounds x 1 local step per site, 2 x 2 centralized steps: hybrid's stage 2 (1000) and seg (200) never start
    unreached = {"global_impression": 1000, "token": 1000, "caption": 1000, "distill": 1000, "seg": 200}
    assert summary["schedule"] == {"federated": {"steps": 2, "terms_never_trained": unreached},
                                   "centralized": {"steps": 4, "terms_never_trained": unreached}}
    assert "federated (2 steps along one model): caption, distill, global_impression, seg, token" in \
        (run_dir / "report.md").read_text()


def test_a_baseline_that_reaches_terms_the_sites_never_do_is_flagged():
    from shared_models.config import compose
    from simulations.run import schedule_comparison, schedule_mismatch

    cfg = compose(["federation.strategy=fedavg", "federation.rounds=2", "federation.local_steps=3",
                   "centralized_steps=all_sites", "objective.schedule.stage2_step=10",
                   "objective.schedule.seg_start_step=4"], config_name="simulate")
    schedule = schedule_comparison(cfg, sites=3)   # 6 steps per site, 18 centralized
    assert schedule["federated"] == {"steps": 6, "terms_never_trained": dict.fromkeys(
        ["global_impression", "token", "caption", "distill"], 10)}
    assert schedule["centralized"] == {"steps": 18, "terms_never_trained": {}}
    notice = schedule_mismatch(schedule)
    assert "caption, distill, global_impression, token" in notice and "not like for like" in notice
    cfg.objective.schedule.stage2_step = 5   # the sites reach stage 2 at their last step
    assert schedule_mismatch(schedule_comparison(cfg, sites=3)) is None
    cfg.federation.strategy = "cyclic"   # one site per round: the model's 6 steps are all the sites' steps
    assert schedule_comparison(cfg, sites=3)["centralized"]["steps"] == 6
    cfg.compare_centralized = False
    assert set(schedule_comparison(cfg, sites=3)) == {"federated"}


def test_per_round_metrics_match_the_run_registry(simulation):
    run_dir, _ = simulation
    summary = json.loads((run_dir / "summary.json").read_text())
    recorded = Registry(run_dir / "registry.sqlite").describe(run_dir.name)
    assert recorded["run"]["status"] == "finished"
    assert [r["round"] for r in summary["rounds"]] == [1, 2] == [r["round"] for r in recorded["rounds"]]
    for entry, row in zip(summary["rounds"], recorded["rounds"]):
        assert entry["global"]["loss"] == pytest.approx(row["metrics"]["loss"])
        assert entry["global"]["examples"] == row["metrics"]["examples"]
        site_rows = [m for m in recorded["site_metrics"] if m["round"] == entry["round"]]
        assert set(entry["sites"]) == {m["site"] for m in site_rows} == set(summary["sites"])
        for m in site_rows:
            assert entry["sites"][m["site"]]["examples"] == m["examples"]
            assert entry["sites"][m["site"]]["loss"] == pytest.approx(m["metrics"]["loss"])
        # the round's loss is the examples-weighted mean of the sites' losses
        total = sum(m["examples"] for m in site_rows)
        assert entry["global"]["loss"] == pytest.approx(sum(m["metrics"]["loss"] * m["examples"] for m in site_rows) / total)
    assert summary["bytes"]["to_sites"] == sum(r["bytes_sent"] for r in recorded["rounds"])


def test_sites_are_patient_disjoint_and_the_deployment_client_app_trained_them(simulation):
    run_dir, _ = simulation
    partition = json.loads((run_dir / "partition.json").read_text())
    patients = [p for site in partition.values() for p in site["patients"]]
    assert len(partition) == 2 and len(patients) == len(set(patients))
    # the deployment ClientApp's audit mod recorded every reply each site sent
    for name in partition:
        lines = (run_dir / "sites" / name / "outgoing.jsonl").read_text().splitlines()
        trained = [json.loads(line) for line in lines if json.loads(line)["type"] == "train"]
        assert len(trained) == 2 and all(t["error"] is None for t in trained)
    staged = (run_dir / "flower" / "app" / "pyproject.toml").read_text()
    assert 'serverapp = "server.app:app"' in staged and 'clientapp = "client.app:app"' in staged
    assert (run_dir / "checkpoints" / "round_0002" / "meta.json").is_file()


def test_no_flower_process_outlives_the_run(simulation):
    run_dir, _ = simulation
    leftovers = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(run_dir) in text:
            leftovers.append(text)
    assert not leftovers, leftovers


def _processes_naming(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            line = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in line:
            found.append(line)
    return found


def test_sigterm_mid_federation_stops_every_flower_process(tmp_path):
    import signal
    import time

    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "simulations.run", f"hydra.run.dir={run_dir}", f"cache_dir={tmp_path / 'cache'}",
               "data.studies=40", "federation.sites=2", "federation.rounds=50", "federation.local_steps=1",
               "train.batch_size=4", "client_resources.num_cpus=1", ONE_ACTOR, "compare_centralized=false"]
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        # the federation is under way once the ServerApp has written round 1's checkpoint
        while not list(run_dir.glob("checkpoints/round_0001")) and time.monotonic() < deadline:
            assert process.poll() is None, "the simulation ended before its first round"
            time.sleep(1)
        below = descendants(process.pid)   # SuperLink, SuperExec, the simulation process, Ray
        assert len(below) >= 3 and _processes_naming(str(run_dir / "flower")), "the federation is not running"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    survivors = [pid for pid in below if _alive(pid)]
    assert not survivors, f"{len(survivors)} of {len(below)} processes outlived the SIGTERM"


class _ScriptedSimulation:
    """Stands in for simulations.flower.LocalSimulation; a subclass scripts what Flower's `run` does."""

    def __init__(self, folder):
        self.folder = folder

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_timed_out_federation_names_its_finished_rounds_and_the_remedy(tmp_path, monkeypatch):
    import simulations.run as run
    from shared_models.config import compose

    class TimedOut(_ScriptedSimulation):
        def run(self, app, overrides, sites, resources, timeout_s, on_poll):
            assert timeout_s == float("inf")  # timeout_s=null: no limit is passed on as one
            raise TimeoutError("Flower run 7 did not finish within 60 s; stopped it")

    monkeypatch.setattr(run, "LocalSimulation", TimedOut)
    cfg = compose([f"cache_dir={tmp_path / 'cache'}", "data.studies=40", "federation.sites=2", "federation.rounds=5",
                   "timeout_s=null"],
                  config_name="simulate")
    with pytest.raises(TimeoutError, match=r"timeout_s=None\). Rounds none of 5 completed and are checkpointed in "
                                           r".*checkpoints .*set timeout_s higher, or null for no limit"):
        run.simulate(cfg, tmp_path / "run", choices={})


def test_a_run_the_server_app_ended_is_stopped_if_flower_keeps_it_going(tmp_path, monkeypatch):
    import json as json_

    from simulations.flower import ClientResources, LocalSimulation

    simulation = LocalSimulation(tmp_path)   # not entered: flwr's answers are scripted below
    simulation.linger_s = 1.5
    asked: list[str] = []
    stopped = {"done": False}

    def flwr(*args, timeout_s=120):
        asked.append(args[0])
        if args[0] == "run":
            return json_.dumps({"run-id": 7})
        if args[0] == "stop":
            stopped["done"] = True
            return ""
        return json_.dumps({"runs": [{"status": "finished:stopped" if stopped["done"] else "running"}]})

    monkeypatch.setattr(simulation, "flwr", flwr)
    monkeypatch.setattr("simulations.flower.subprocess.run", lambda *a, **k: subprocess.CompletedProcess(a, 0, "", ""))
    # the registry says the run ended (on_poll True) while Flower still lists it as running, with no timeout
    record = simulation.run(tmp_path, [], 2, ClientResources(1, 0), float("inf"), on_poll=lambda: True)
    assert record["status"] == "finished:stopped" and asked.count("stop") == 1
    assert asked[0] == "run" and asked[-1] == "ls"


def test_the_apps_compose_the_runs_model_even_without_its_group_choice():
    from omegaconf import OmegaConf

    from shared_models.config import compose
    from simulations.run import app_overrides

    # The simulate default's tiny_cnn lacks two keys of config.yaml's tiny (its ViT depth and global_pool) and has
    # one tiny lacks (its stem): overriding values alone would fail, or build a resnet10t with a ViT's depth kwarg.
    cfg = compose(["model=tiny_cnn"], config_name="simulate")
    for choices in ({}, {"model": "tiny_cnn"}):
        overrides = app_overrides(cfg, choices, forced={})
        assert OmegaConf.to_container(compose(overrides).model, resolve=True) == \
            OmegaConf.to_container(cfg.model, resolve=True)
    assert {"~model.image.kwargs.depth", "+model.image.kwargs.stem_type=deep"} <= set(app_overrides(cfg, {}, forced={}))


def test_the_apps_compose_a_section_the_run_sets_to_null():
    """`train.augmentation=null` (no augmentation) reaches the apps as one override, not as `+train.augmentation`
    (refused: the key exists) beside deletions of its default's keys."""
    from omegaconf import OmegaConf

    from shared_models.config import compose
    from simulations.run import APP_SECTIONS, app_overrides

    cfg = compose(["train.augmentation=null", "train.lr=8e-4"], config_name="simulate")
    overrides = app_overrides(cfg, {}, forced={})
    assert "train.augmentation=null" in overrides and "train.lr=0.0008" in overrides
    assert not any(o.startswith(("~train.augmentation", "+train.augmentation")) for o in overrides)
    composed = OmegaConf.to_container(compose(overrides), resolve=True)
    run = OmegaConf.to_container(cfg, resolve=True)
    assert composed["train"]["augmentation"] is None
    assert {section: composed[section] for section in APP_SECTIONS} == {section: run[section] for section in APP_SECTIONS}


def test_a_federation_whose_server_app_fails_at_start_names_the_error_from_flowers_log(tmp_path, monkeypatch):
    import simulations.run as run
    from shared_models.config import compose

    class FailsAtStart(_ScriptedSimulation):   # what Flower does when the ServerApp raises before it records the run
        def run(self, app, overrides, sites, resources, timeout_s, on_poll):
            (self.folder / "flower_run.log").write_text(
                "Traceback (most recent call last):\n  File \"server/app.py\", line 1, in main\n"
                "ValueError: num_channels (24) must be divisible by num_groups (32)\nERROR :     Exit Code: 700\n")
            assert not on_poll()   # no registry yet: the progress poll waits rather than fails
            return {"status": "finished:failed"}

    monkeypatch.setattr(run, "LocalSimulation", FailsAtStart)
    cfg = compose([f"cache_dir={tmp_path / 'cache'}", "data.studies=40", "federation.sites=2"], config_name="simulate")
    with pytest.raises(RuntimeError, match=r"never started \(Flower: finished:failed\): ValueError: num_channels \(24\) "
                                           r"must be divisible by num_groups \(32\); see .*flower_run\.log"):
        run.simulate(cfg, tmp_path / "run", choices={})


def test_report_shows_every_label_fraction_and_the_seed_count(tmp_path):
    from simulations.report import final_table, write_report

    def result(base: float) -> dict:
        return {"linear_probe": {f: {"mean_auc": {"mean": base + k / 10, "std": 0.01 * (k + 1),
                                                  "per_seed": [base + k / 10] * 3}, "per_label": {}}
                                 for k, f in enumerate(["0.01", "0.1", "1.0"])}}

    summary = {"config": {"seeds": 3, "partition": {"name": "iid"}, "model": {"name": "tiny_cnn"},
                          "objective": {"name": "hybrid"}, "federation": {"rounds": 1, "local_steps": 1}},
               "sites": {"site_0": {}}, "final": {"federated": result(0.6), "centralized": result(0.5),
                                                   "random": result(0.4)},
               "rounds": [{"round": 1, "sites": {"site_0": {"loss": 1.0}}, "global": {"loss": 1.0, "seconds": 1.0}}],
               "wall_s": 1.0, "bytes_sent": 0, "bytes": {"to_sites": 0, "to_server": 0}, "epsilon": {}}
    table = final_table(summary)
    assert "evaluated at 0.01, 0.1, 1.0 of the labels, 3 seeds (mean ± std over seeds)" in table
    assert "| federated | 0.600 ± 0.010 | 120.0% | 0.700 ± 0.020 | 116.7% | 0.800 ± 0.030 | 114.3% |" in table
    assert "| random | 0.400 ± 0.010 | 80.0% |" in table
    report = write_report(tmp_path, summary, "| site |").read_text()
    assert table in report and (tmp_path / "final_auc.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_command_keeps_the_runs_overrides_and_folder(tmp_path):
    from simulations.run import checkpointed_rounds, resume_command, stopped_notice

    for round_, complete in ((1, True), (2, True), (3, False)):   # round 3 was cut before its meta.json
        folder = tmp_path / "checkpoints" / f"round_{round_:04d}"
        folder.mkdir(parents=True)
        if complete:
            (folder / "meta.json").write_text("{}")
    assert checkpointed_rounds(tmp_path) == [1, 2]
    command = resume_command(tmp_path, ["data=manifest", "federation.resume=false", "label_fraction=[0.1,1.0]"])
    assert command == (f"python -m simulations.run data=manifest 'label_fraction=[0.1,1.0]' hydra.run.dir={tmp_path} "
                       "federation.resume=true")
    notice = stopped_notice(tmp_path, 5, ["data=manifest"], 2)
    assert notice.startswith(f"stopped by SIGINT: rounds 1, 2 of 5 are checkpointed in {tmp_path / 'checkpoints'}")
    assert notice.endswith(f"resume with: python -m simulations.run data=manifest hydra.run.dir={tmp_path} "
                           "federation.resume=true")


def test_report_shows_each_terms_curve_and_start_the_bytes_each_way_and_each_seed(tmp_path):
    from simulations.report import aggregate_terms, write_report

    def site(examples: float, loss: float, **terms) -> dict:
        return {"examples": examples, "loss": loss, "seconds": 2.0, "steps": 5.0, "setup_s": 0.5, **terms}

    rounds = [{"round": 1, "sites": {"site_0": site(16, 3.0, global_=1.0), "site_1": site(48, 2.0, global_=2.0)},
               "global": {"loss": 2.25, "seconds": 4.0, "bytes_sent": 2_000_000, "bytes_received": 1_000_000}},
              {"round": 2, "sites": {"site_0": site(16, 1.0, global_=0.5, seg=0.3), "site_1": site(48, 1.0, global_=0.5)},
               "global": {"loss": 1.0, "seconds": 4.0, "bytes_sent": 2_000_000, "bytes_received": 1_000_000}}]
    # examples-weighted over the sites that trained the term: 16 x 1.0 + 48 x 2.0 over 64; seg only at site_0
    curves = aggregate_terms(rounds)
    assert curves["global_"] == [(1, 1.75), (2, 0.5)] and curves["seg"] == [(2, 0.3)]
    assert "setup_s" not in curves and "examples" not in curves
    probe = {"0.1": {"mean_auc": {"mean": 0.65, "std": 0.01, "per_seed": [0.64, 0.65, 0.66]}}}
    summary = {"config": {"seeds": 3, "partition": {"name": "scanner"}, "model": {"name": "tiny_cnn"},
                          "objective": {"name": "hybrid"},
                          "federation": {"rounds": 2, "local_steps": 5, "strategy": "fedavg"}},
               "sites": {"site_0": {}, "site_1": {}}, "rounds": rounds,
               "final": {"federated": {"linear_probe": probe},
                         "centralized": {"linear_probe": probe, "training": {
                             "steps": 20, "loss_start": {"global_": 2.0}, "loss_end": {"global_": 0.4, "seg": 0.2}}}},
               "wall_s": 9.0, "bytes_sent": 6_000_000, "bytes": {"to_sites": 4_000_000, "to_server": 2_000_000},
               "epsilon": {},
               "schedule": {"federated": {"steps": 10, "terms_never_trained": {}},
                            "centralized": {"steps": 20, "terms_never_trained": {}}},
               "term_starts": {"federated": {"global_": 0, "seg": 2, "token": 4},
                               "centralized": {"global_": 0, "seg": 4, "token": 8}}}
    report = write_report(tmp_path, summary, "| site_0 |").read_text()
    assert (tmp_path / "loss_per_term.png").read_bytes()[:4] == b"\x89PNG"
    assert "| global_ | 0 | yes | 0 | yes |" in report and "| seg | 2 | yes | 4 | yes |" in report
    assert "| token | 4 | **no** | 8 | **no** |" in report   # no loss recorded: the report says it never trained
    assert "| 1 | 2 | - | 2.2500 | 4.0 | 2.00 | 1.00 |" in report
    assert "4.0 MB to the sites, 2.0 MB back (2.00 and 1.00 MB per round)" in report
    assert "| site_1 | 2 | 96 | 2.0 | 2.0000 | 1.0000 |" in report
    assert "| federated | 0.640 | 0.650 | 0.660 |" in report and "## Sites (the partition)\n\n| site_0 |" in report


def test_concurrent_sites_tell_ray_how_many_cpus_to_hand_out_and_the_baseline_steps_follow_the_choice():
    from omegaconf import OmegaConf

    from simulations.flower import ClientResources
    from simulations.run import centralized_steps

    # Ray hands out whole CPUs: 3 one-CPU sites at once on any machine means telling Ray it has 3
    assert ClientResources.from_machine(1, 0, 3).federation_config(3) == \
        "num-supernodes=3 client-resources-num-cpus=1 client-resources-num-gpus=0.0 init-args-num-cpus=3"
    assert "init-args" not in ClientResources.from_machine(2, 0).federation_config(3)
    with pytest.raises(ValueError, match="concurrent_sites must be at least 1"):
        ClientResources.from_machine(1, 0, 0)
    fed = {"rounds": 10, "local_steps": 20, "strategy": "fedavg"}
    assert centralized_steps(OmegaConf.create({"federation": fed}), 3) == 600   # unset: every site's steps
    assert centralized_steps(OmegaConf.create({"federation": fed, "centralized_steps": "one_model"}), 3) == 200
    assert centralized_steps(OmegaConf.create({"federation": fed, "centralized_steps": 50}), 3) == 50
    assert centralized_steps(OmegaConf.create({"federation": {**fed, "strategy": "cyclic"},
                                               "centralized_steps": "all_sites"}), 3) == 200
    with pytest.raises(ValueError, match="all_sites, one_model or a positive number"):
        centralized_steps(OmegaConf.create({"federation": fed, "centralized_steps": "half"}), 3)


def test_the_baselines_curves_come_from_its_step_history_where_it_kept_one():
    from simulations.report import centralized_curves

    history = [{"loss": 3.0, "global": 1.0}, {"loss": 2.0, "global": 0.8, "token": 0.5}]
    assert centralized_curves({"steps": 2, "loss_history": history}) == {
        "loss": [(0.5, 3.0), (1.0, 2.0)], "global": [(0.5, 1.0), (1.0, 0.8)], "token": [(1.0, 0.5)]}
    # without it, the means of the first and last steps the summary records
    assert centralized_curves({"steps": 2, "loss_start": {"global": 1.0}, "loss_end": {"global": 0.8}}) == {
        "global": [(0.0, 1.0), (1.0, 0.8)]}


def test_the_run_relinkage_audit_attacks_the_global_model_with_the_runs_own_members(simulation, tmp_path):
    from omegaconf import OmegaConf

    from client.data.dataset import CxrDataset
    from simulations.privacy_audit import write_outputs
    from simulations.relinkage_audit import RunFolderError, audit_run, run_membership

    run_dir, _ = simulation
    cfg = OmegaConf.create({"confidence": 0.95, "relinkage": {"fpr": 0.01, "bootstrap": 50, "seed": 0}})
    trained, catalog, cache = run_membership(run_dir)
    everyone = CxrDataset(catalog, cache, split=None, image_size=64, augmentation=None)
    partition = json.loads((run_dir / "partition.json").read_text())
    member_patients = {p for site in partition.values() for p in site["patients"]}
    nonmember_studies = {s for s, p in zip(everyone.study_ids, everyone.patient_ids) if p not in member_patients}
    assert trained and nonmember_studies and not trained & nonmember_studies

    untrained, global_model = audit_run(run_dir, cfg)
    for row in (untrained, global_model):       # one scored image per study: every trained study is a member
        assert (row["members"], row["nonmembers"]) == (len(trained), len(nonmember_studies))
        assert 0.0 <= row["auc_ci"][0] <= row["auc"] <= row["auc_ci"][1] <= 1.0
    assert untrained["accountant_epsilon"] == 0.0 and global_model["accountant_epsilon"] == math.inf  # no DP
    assert untrained["member_margin_mean"] != global_model["member_margin_mean"]   # two different models scored
    write_outputs(tmp_path / "audit", cfg, [], None, [untrained, global_model])
    assert json.loads((tmp_path / "audit" / "audit.json").read_text())["run_relinkage"][1]["arm"] == \
        f"{run_dir.name}: global model"
    assert f"| {run_dir.name}: global model | inf | {len(trained)} / {len(nonmember_studies)} |" in \
        (tmp_path / "audit" / "audit.md").read_text()

    # a partition naming a study the collection does not hold is another collection's run: refused by name
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "sites").mkdir(parents=True)
    for site_file in (run_dir / "sites").glob("*.yaml"):
        (elsewhere / "sites" / site_file.name).write_text(site_file.read_text())
    (elsewhere / "checkpoint").symlink_to(run_dir / "checkpoint")
    (elsewhere / "partition.json").write_text(json.dumps({"site_0": {"studies": sorted(trained) + ["no-such-study"]}}))
    with pytest.raises(RunFolderError, match="lacks 1 of the .* studies the run trained on"):
        audit_run(elsewhere, cfg)
    with pytest.raises(RunFolderError, match="is not a folder"):
        audit_run(tmp_path / "missing", cfg)


def test_the_term_plot_of_a_run_whose_sites_send_no_term_losses_draws_without_a_legend_warning(tmp_path):
    import warnings

    from simulations.report import plot_term_curves

    def summary(sites: dict) -> dict:   # a DP run's sites send no per-term losses; the baseline is off
        return {"config": {"federation": {"rounds": 2}}, "final": {},
                "rounds": [{"round": r, "sites": sites, "global": {}} for r in (1, 2)],
                "schedule": {"federated": {"steps": 10}}, "term_starts": {"federated": {"seg": 0, "global_": 0}}}

    with warnings.catch_warnings():
        warnings.simplefilter("error")       # matplotlib warns when asked for a legend of a panel with no curve
        plot_term_curves(tmp_path / "none.png", summary({"site_0": {"examples": 4, "loss": 1.0}}))
        plot_term_curves(tmp_path / "second.png", summary({"site_0": {"examples": 4, "loss": 1.0, "global_": 0.5}}))
    assert (tmp_path / "none.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "second.png").stat().st_size > 0
