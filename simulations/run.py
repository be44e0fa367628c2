"""`python -m simulations.run`: virtual sites on one machine — partition, federate with the deployment's apps, evaluate."""
from __future__ import annotations

import json
import logging
import os
import re
import shlex
import signal
import sys
import time
from pathlib import Path

import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from sqlalchemy.exc import OperationalError

from client.data.catalog import open_catalog, usable_studies
from server.strategy import strategy_from_config
from shared_models.config import compose, hydra_entry
from shared_models.model import schedule_notice, term_start_steps, terms_never_trained
from simulations.data import PreparedData, prepare_data
from simulations.flower import ClientResources, LocalSimulation, stage_app
from simulations.partition import Site, composition, composition_markdown, partition, save_partition
from simulations.report import final_table, write_report

log = logging.getLogger("simulations.run")
# What the ServerApp and ClientApps compose from the run config's overrides. Not `data`: a site's data is its own
# site file's business (a virtual site's file is written below), never the coordinator's (docs/security.md).
APP_SECTIONS = ("seed", "train", "model", "objective", "federation", "privacy", "partition")


# ------------------------------------------------------------------------------------------ sites
def held_out_patients(catalog, cfg: DictConfig) -> set[str]:
    """Patients of the evaluation splits: none of them may reach a site."""
    splits = [cfg.eval_split.train, cfg.eval_split.test]
    names = [s for split in splits for s in ([split] if isinstance(split, str) else list(split))]
    return {study.patient_id for study in usable_studies(catalog, names, require_report=False)}   # image-only tasks too


def write_site_files(folder: Path, sites: list[Site], cfg: DictConfig, data: PreparedData,
                     resources: ClientResources) -> Path:
    """One site file per virtual site, `<partition-id>.yaml`, as the ClientApp reads it (client/app.py)."""
    folder.mkdir(parents=True, exist_ok=True)
    device = "cuda" if resources.num_gpus > 0 else "cpu"
    for index, site in enumerate(sites):
        body = {
            "name": site.name,
            "data": site_data(cfg, data),
            "catalog": str(Path(data.catalog).resolve()),
            "cache": str(Path(data.cache).resolve()),
            "studies": site.studies,
            # DP-SGD's sample rate uses a count the site declares public (docs/privacy.md); a virtual site's is its
            # partition's patient count, which the simulation already knows
            "public_patient_count": len(site.patients),
            "scanner": None if site.scanner is None else {"site_index": site.scanner, "seed": int(cfg.seed)},
            "state_dir": str((folder / site.name).resolve()),
            # A virtual site exists for this run only, and so does its privacy ledger: the catalog above is shared
            # by every run on this machine, whose virtual sites of the same name hold other patients.
            "ledger": str((folder / site.name / "ledger.sqlite").resolve()),
            "device": device,
            "threads": resources.num_cpus,
            # a virtual site's own caps: the run's caps where set, else no epsilon limit of its own and the
            # usual delta of 1e-5 (DP-SGD refuses a delta that is not far below 1 / the site's patients)
            "privacy": {"max_epsilon": float(cfg.federation.privacy.max_epsilon or 1e9),
                        "max_delta": float(cfg.federation.privacy.max_delta or 1e-5)},
        }
        (folder / f"{index}.yaml").write_text(yaml.safe_dump(body, sort_keys=False))
    return folder


def site_data(cfg: DictConfig, data: PreparedData) -> dict:
    """A virtual site's `data` section, resolved. The run has indexed the data already (`index: false`), so the
    site needs no reports or manifest location: its studies are in the catalog and cache named beside it."""
    return {"root": str(Path(data.root).resolve()), "layout": str(cfg.data.layout),
            "split": str(cfg.partition.split), "index": False}


# ------------------------------------------------------------------------------- app overrides
def _hydra_value(value) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{key}:{_hydra_value(v)}" for key, v in value.items()) + "}"
    text = str(value)
    return text if re.fullmatch(r"[\w./:+@-]+", text) else "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _leaves(node, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        return {k: v for key, child in node.items() for k, v in _leaves(child, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def _select(tree: dict, key: str):
    for part in key.split("."):
        tree = tree[part]
    return tree


def app_overrides(cfg: DictConfig, choices: dict[str, str], forced: dict[str, object]) -> list[str]:
    """Hydra overrides under which the ServerApp and ClientApps compose this run's configuration:
    the config group choices, then every value that differs from what they would compose."""
    groups = [f"{group}={choice}" for group, choice in choices.items() if group in APP_SECTIONS and choice]
    wanted = OmegaConf.create({k: OmegaConf.to_container(cfg, resolve=True)[k] for k in APP_SECTIONS})
    for key, value in forced.items():
        OmegaConf.update(wanted, key, value, force_add=True)
    want = _leaves(OmegaConf.to_container(wanted))

    def composed_leaves(overrides: list[str]) -> dict[str, object]:
        composed = OmegaConf.to_container(compose(overrides), resolve=True)
        return _leaves({k: composed.get(k) for k in APP_SECTIONS})

    have = composed_leaves(groups)
    # a section that one side has and the other sets to one value (`train.augmentation=null`, or a dict where the
    # apps' default is null) is passed whole; below it, keys only this run has are appended (`+`) and keys only the
    # apps' defaults have deleted (`~`): another preset's kwargs, a `~key` on the command line
    reshaped = {key for key in want if any(k.startswith(key + ".") for k in have)} | \
               {key for key in have if any(k.startswith(key + ".") for k in want)}

    def in_reshaped(key: str) -> bool:
        return any(key == section or key.startswith(section + ".") for section in reshaped)

    whole = OmegaConf.to_container(wanted)
    overrides = groups + [f"{key}={_hydra_value(_select(whole, key))}" for key in sorted(reshaped)]
    overrides += [f"{'' if key in have else '+'}{key}={_hydra_value(value)}" for key, value in want.items()
                  if not in_reshaped(key) and have.get(key, object()) != value]
    overrides += [f"~{key}" for key in have if key not in want and not in_reshaped(key)]
    got = composed_leaves(overrides)
    absent = object()
    differing = [key for key in want.keys() | got.keys() if got.get(key, absent) != want.get(key, absent)]
    if differing:
        raise RuntimeError(f"the apps would not compose this run's configuration (differs at {differing[:5]})")
    return overrides


# ------------------------------------------------------------------------------------ registry
def readonly_registry(path: Path):
    """The run registry opened without creating its tables: the ServerApp creates them, and a poll
    that did so too would race it."""
    from sqlalchemy import create_engine

    from server.registry import Registry

    registry = Registry.__new__(Registry)
    registry.engine = create_engine(f"sqlite:///file:{Path(path).resolve()}?mode=ro&uri=true",
                                    connect_args={"timeout": 30})
    return registry


def last_error(log: Path) -> str:
    """The last `SomeError: message` line of a Flower run's log (where a ServerApp's or ClientApp's traceback ends)."""
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    errors = [line.strip() for line in lines if re.match(r"^\s*[\w.]*(Error|Exception): ", line)]
    return errors[-1] if errors else f"no error message in {log.name}"


def read_rounds(registry_path: Path, run_name: str) -> tuple[list[dict], dict]:
    """Per round: each site's loss terms, examples and seconds, and the round's global metrics (from the registry)."""
    described = readonly_registry(registry_path).describe(run_name)
    rounds = []
    for row in described["rounds"]:
        sites = {m["site"]: {**{k: v for k, v in m["metrics"].items() if k not in ("seconds",)},
                             "examples": m["examples"], "seconds": m["metrics"].get("seconds")}
                 for m in described["site_metrics"] if m["round"] == row["round"]}
        rounds.append({"round": row["round"], "sites": sites,
                       "global": {**row["metrics"], "seconds": row["seconds"], "status": row["status"],
                                  "bytes_sent": row["bytes_sent"], "bytes_received": row["bytes_received"]}})
    return rounds, described


# ------------------------------------------------------------------------------------ evaluation
def evaluate_checkpoint(cfg: DictConfig, checkpoint: str | Path, folder: Path) -> dict:
    from evaluation.run import evaluate

    eval_cfg = cfg.copy()
    eval_cfg.checkpoint = str(checkpoint)
    return evaluate(eval_cfg, folder, data_name=_data_name())


def _data_name() -> str | None:
    return HydraConfig.get().runtime.choices.get("data") if HydraConfig.initialized() else None


def pooled_dataset(cfg: DictConfig, data: PreparedData, sites: list[Site]):
    """The sites' studies in one dataset, each image rendered by its own site's scanner (as the sites see it)."""
    from client.data.dataset import CxrDataset
    from client.data.scanner import apply_scanner, scanner_profile
    from client.data.transforms import augmentation_settings

    dataset = CxrDataset(data.catalog, data.cache, split=str(cfg.partition.split),
                         augmentation=augmentation_settings(cfg.train),
                         image_size=cfg.train.image_size or cfg.model.image.img_size,
                         study_ids=[s for site in sites for s in site.studies])
    profile_of_study = {study: scanner_profile(site.scanner, int(cfg.seed))
                        for site in sites if site.scanner is not None for study in site.studies}
    if profile_of_study:
        profile_of_image = {e.image_id: profile_of_study[e.study_id] for e in dataset.images}
        dataset.site_transform = lambda image, image_id: apply_scanner(image, profile_of_image[image_id], image_id)
    return dataset


def centralized_steps(cfg: DictConfig, sites: int) -> int:
    """The centralized baseline's optimizer steps (`centralized_steps`): `all_sites` (default) every site's local
    steps, the examples the federation saw; `one_model` rounds x local steps, the steps the global model takes
    (under FedAvg a third of the examples for 3 sites, a third of the time); or a number."""
    choice = cfg.get("centralized_steps") or "all_sites"
    if choice == "all_sites":
        return strategy_from_config(cfg.federation).total_local_steps(int(cfg.federation.rounds),
                                                                    int(cfg.federation.local_steps), sites)
    if choice == "one_model":
        return int(cfg.federation.rounds) * int(cfg.federation.local_steps)
    if isinstance(choice, int) and choice > 0:
        return choice
    raise ValueError(f"centralized_steps={choice!r}: give all_sites, one_model or a positive number of steps")


def train_centralized_baseline(cfg: DictConfig, folder: Path, data: PreparedData, sites: list[Site]) -> tuple[Path, dict]:
    """The centralized model with `centralized_steps` and the sites' batch size and lr (`train.*`)."""
    from simulations.centralized import train_centralized

    steps = centralized_steps(cfg, len(sites))
    folder.mkdir(parents=True, exist_ok=True)
    summary = train_centralized(cfg, folder, dataset=pooled_dataset(cfg, data, sites), steps=steps)
    return folder / "checkpoint", summary


def schedule_comparison(cfg: DictConfig, sites: int) -> dict:
    """Each arm's optimizer steps along one model's schedule and the weighted terms it never reaches: a site
    continues its local steps over the rounds, the centralized baseline takes all sites' steps in one run."""
    per_site = int(cfg.federation.rounds) * int(cfg.federation.local_steps)
    arms = {"federated": per_site,
            **({"centralized": centralized_steps(cfg, sites)} if cfg.compare_centralized else {})}
    return {arm: {"steps": steps, "terms_never_trained": terms_never_trained(cfg.objective, steps)}
            for arm, steps in arms.items()}


def schedule_mismatch(schedule: dict) -> str | None:
    """A notice when the centralized baseline trains terms that the sites never reach."""
    if "centralized" not in schedule:
        return None
    only_central = sorted(set(schedule["federated"]["terms_never_trained"])
                          - set(schedule["centralized"]["terms_never_trained"]))
    if not only_central:
        return None
    return (f"not like for like: the centralized baseline ({schedule['centralized']['steps']} steps) trains "
            f"{', '.join(only_central)}, which the sites ({schedule['federated']['steps']} local steps each) never "
            "reach under objective.schedule; lower objective.schedule.stage2_step / seg_start_step below the sites' "
            "steps to compare the same objective")


def missing_split_hint(catalog_path, wanted: str) -> str:
    """What to do when no study is in the pre-training split: usually the data has no split column at all."""
    catalog = open_catalog(catalog_path, readonly=True)
    try:
        splits = {entry.split for entry in usable_studies(catalog, None, require_report=False)}
    finally:
        catalog.close()
    if splits == {None}:
        return ("no study has a split: add a `split` column to the manifest (train / validate / test, the same value "
                "for every row of a patient). The simulation pre-trains on partition.split and evaluates on "
                "eval_split's held-out patients")
    return f"the data's splits are {sorted(s for s in splits if s)}: set partition.split to one of them"


# ------------------------------------------------------------------------------------------ main
def simulate(cfg: DictConfig, run_dir: Path, choices: dict[str, str] | None = None) -> dict:
    """The whole simulation into `run_dir`; returns summary.json's content. `choices` are the config
    group choices (`model=...`) cfg was composed with: Hydra's, when run as `python -m simulations.run`."""
    if choices is None:
        choices = dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}
    started = time.monotonic()
    run_dir = run_dir.resolve()
    data = prepare_data(cfg.data)
    catalog = open_catalog(data.catalog, readonly=True)
    try:
        # with the studies that lack a report: the partition counts them per site and pre-trains on the others
        studies = usable_studies(catalog, str(cfg.partition.split), require_report=False)
        held_out = held_out_patients(catalog, cfg)
    finally:
        catalog.close()
    if not studies:
        raise ValueError(f"{data.catalog} has no usable studies in split {cfg.partition.split!r}; "
                         + missing_split_hint(data.catalog, str(cfg.partition.split)))
    sites = partition(studies, int(cfg.federation.sites), cfg.partition, int(cfg.seed), held_out)
    table = composition(sites, studies)
    save_partition(run_dir, sites, table)
    print(f"\n{len(sites)} sites ({cfg.partition.name}), patient-disjoint, none in the evaluation splits:\n"
          + composition_markdown(table) + "\n", flush=True)

    resources = ClientResources.from_machine(cfg.client_resources.num_cpus, cfg.client_resources.num_gpus,
                                             cfg.client_resources.get("concurrent_sites"))
    site_dir = write_site_files(run_dir / "sites", sites, cfg, data, resources)
    run_name = run_dir.name   # the server's run folder <output_dir>/<run_name>/ is this run directory
    forced = {"federation.site_dir": str(site_dir),
              "federation.output_dir": str(run_dir.parent), "federation.run_name": run_name,
              "federation.registry": str(run_dir / "registry.sqlite"), "federation.sites": len(sites),
              "federation.min_sites": len(sites), "federation.resume": bool(cfg.federation.resume)}
    overrides = app_overrides(cfg, choices, forced)
    (run_dir / "app_overrides.txt").write_text("\n".join(overrides) + "\n")

    printed: set[int] = set()

    def show_progress() -> bool:
        """Print rounds as the registry records them; True once the run has ended there."""
        if not (run_dir / "registry.sqlite").is_file():
            return False
        try:
            rounds, described = read_rounds(run_dir / "registry.sqlite", run_name)
        except (KeyError, OperationalError):   # the ServerApp has not recorded the run yet
            return False
        for entry in rounds:
            if entry["round"] not in printed:
                printed.add(entry["round"])
                loss = entry["global"].get("loss")
                print(f"round {entry['round']}/{cfg.federation.rounds}: {len(entry['sites'])} sites"
                      + (f", loss {loss:.4f}" if loss is not None else "") + f", {entry['global']['seconds']:.0f} s", flush=True)
        return described["run"]["status"] != "running"

    schedule = schedule_comparison(cfg, len(sites))
    trainer = strategy_from_config(cfg.federation).schedule_trainer
    for notice in [schedule_notice(cfg.objective, schedule["federated"]["steps"], trainer), schedule_mismatch(schedule)]:
        if notice:
            print(f"NOTICE: {notice}", flush=True)
    print(f"federation: {cfg.federation.rounds} rounds x {cfg.federation.local_steps} local steps on {len(sites)} "
          f"virtual sites ({resources.num_cpus} CPU, {resources.num_gpus:g} GPU each"
          + (f", {resources.concurrent_sites} at once" if resources.concurrent_sites else "")
          + "), Flower simulation runtime", flush=True)
    app = stage_app(run_dir / "flower" / "app")
    timeout_s = float("inf") if cfg.timeout_s is None else float(cfg.timeout_s)
    with LocalSimulation(run_dir / "flower") as simulation:
        try:
            record = simulation.run(app, overrides, len(sites), resources, timeout_s, on_poll=show_progress)
        except TimeoutError as err:
            raise TimeoutError(
                f"{err} (timeout_s={cfg.timeout_s}). Rounds {sorted(printed) or 'none'} of {cfg.federation.rounds} "
                f"completed and are checkpointed in {run_dir / 'checkpoints'} (evaluate one with python -m "
                "evaluation.run checkpoint=...); for a longer run set timeout_s higher, or null for no limit") from err
    flower_log = run_dir / "flower" / "flower_run.log"
    try:
        rounds, described = read_rounds(run_dir / "registry.sqlite", run_name)
    except (KeyError, OperationalError) as err:   # the ServerApp failed before it recorded the run
        raise RuntimeError(f"the federation never started (Flower: {record['status']}): {last_error(flower_log)}; "
                           f"see {flower_log}") from err
    if record["status"] != "finished:completed" or described["run"]["status"] != "finished":
        raise RuntimeError(f"the federation did not complete (Flower: {record['status']}, registry: "
                           f"{described['run']['status']}, {described['run'].get('error')}); the last error in Flower's "
                           f"log: {last_error(flower_log)}; see {flower_log}")

    if cfg.eval_rounds:
        for entry in rounds:
            folder = run_dir / "checkpoints" / f"round_{entry['round']:04d}"
            result = evaluate_checkpoint(cfg, folder, run_dir / "evaluation" / f"round_{entry['round']:04d}")
            entry["global"]["linear_probe_mean_auc"] = _mean_auc(result)
    final = {"federated": evaluate_checkpoint(cfg, run_dir / "checkpoint", run_dir / "evaluation" / "federated")}
    if cfg.compare_centralized:
        checkpoint, central_summary = train_centralized_baseline(cfg, run_dir / "centralized", data, sites)
        final["centralized"] = evaluate_checkpoint(cfg, checkpoint, run_dir / "evaluation" / "centralized")
        final["centralized"]["training"] = central_summary
    final["random"] = evaluate_checkpoint(cfg, "random", run_dir / "evaluation" / "random")

    epsilon = {}
    for entry in rounds:
        for site, metrics in entry["sites"].items():
            if "epsilon" in metrics:
                epsilon[site] = metrics["epsilon"]
    summary = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "sites": {name: {k: row[k] for k in ("studies", "patients", "finding_mix", "scanner")} for name, row in table.items()},
        "rounds": rounds,
        "final": final,
        "wall_s": round(time.monotonic() - started, 1),
        "bytes_sent": sum(r["global"]["bytes_sent"] + r["global"]["bytes_received"] for r in rounds),
        "bytes": {"to_sites": sum(r["global"]["bytes_sent"] for r in rounds),
                  "to_server": sum(r["global"]["bytes_received"] for r in rounds)},
        "epsilon": epsilon,
        # site-level DP-FedAvg's epsilon after the last round (server/central_dp.py); None without central DP
        "central_epsilon": next((r["global"]["central_epsilon"] for r in reversed(rounds)
                                 if "central_epsilon" in r["global"]), None),
        "schedule": schedule,
        # each weighted term's first step in each arm, its fractions resolved against that arm's steps
        "term_starts": {arm: term_start_steps(cfg.objective, entry["steps"]) for arm, entry in schedule.items()},
        "flower": {"run_id": record.get("run-id"), "status": record["status"], "client_resources": vars(resources)},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    write_report(run_dir, summary, composition_markdown(table))
    return summary


def _mean_auc(result: dict) -> float | None:
    probe = result.get("linear_probe") or {}
    first = next(iter(probe.values()), None)
    return None if first is None else first["mean_auc"]["mean"]


class Stopped(BaseException):
    """Ctrl-C, SIGTERM or SIGHUP: unwinds (not an Exception, so no handler swallows it) through
    LocalSimulation.__exit__, which stops the SuperLink, SuperExec and Ray by PID."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop_on_signal(signum, frame) -> None:
    raise Stopped(signum)


def checkpointed_rounds(run_dir: Path) -> list[int]:
    """Rounds whose checkpoint is complete (meta.json is written last)."""
    return sorted(int(folder.name.split("_")[1]) for folder in (run_dir / "checkpoints").glob("round_[0-9]*")
                  if (folder / "meta.json").is_file())


def resume_command(run_dir: Path, overrides: list[str]) -> str:
    """The command that continues this run in its folder from its last complete round."""
    kept = [o for o in overrides if o.split("=", 1)[0] not in ("federation.resume", "hydra.run.dir")]
    return shlex.join(["python", "-m", "simulations.run", *kept, f"hydra.run.dir={run_dir}", "federation.resume=true"])


def stopped_notice(run_dir: Path, rounds: int, overrides: list[str], signum: int) -> str:
    done = checkpointed_rounds(run_dir)
    where = (f"rounds {', '.join(map(str, done))} of {rounds} are checkpointed in {run_dir / 'checkpoints'}"
             if done else "no round was checkpointed yet")
    return (f"stopped by {signal.Signals(signum).name}: {where}; the Flower processes this run started are stopped.\n"
            f"resume with: {resume_command(run_dir, overrides)}")


def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop_on_signal)
    run_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    try:
        summary = simulate(cfg, run_dir)
    except Stopped as stop:
        print("\n" + stopped_notice(run_dir, int(cfg.federation.rounds), list(HydraConfig.get().overrides.task),
                                    stop.signum), file=sys.stderr, flush=True)
        # Everything worth keeping is on disk (checkpoints are written atomically) and the Flower processes are
        # gone: skip the interpreter's teardown of torch & co., seconds on a busy machine, so Ctrl-C ends in 5 s.
        logging.shutdown()
        sys.stdout.flush()
        os._exit(128 + stop.signum)
    print("\n" + final_table(summary))
    print(f"\nsummary: {run_dir / 'summary.json'}\nreport:  {run_dir / 'report.md'}")


if __name__ == "__main__":
    hydra_entry("simulate", main, config_name="simulate")
