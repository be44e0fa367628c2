"""`python -m server.runs`: which node is which site, and finding the registry without --registry."""
import json
import subprocess
import sys
import time

import pytest

from server.registry import Registry
from server.runs import find_registry, main as runs_main, running_superlinks


def _two_site_registry(path):
    """Run cxr-1: site_a (node 101) joins rounds 1-2, site_b (node 202) round 1, misses round 2; node 303 never
    answers. Run cxr-2: site_a on a new node 111 (re-provisioned)."""
    registry = Registry(path)
    registry.start_run("cxr-1", "1", 2, {}, "h")
    for site, node in [("site_a", 101), ("site_b", 202)]:
        registry.add_site_node("cxr-1", 1, site, node, 40)
    registry.add_site_metrics("cxr-1", 1, "site_a", 101, 40, {"loss": 1.0})
    registry.add_site_metrics("cxr-1", 1, "site_b", 202, 30, {"loss": 1.2})
    registry.add_round("cxr-1", 1, status="complete", sites_asked=3, sites_accepted=2, seconds=1.0, bytes_sent=1,
                       bytes_received=1, metrics={})
    registry.add_rejection("cxr-1", 1, "node 303", 303, ["no reply within 900 s"])
    time.sleep(1.1)   # round 2 ends visibly later
    registry.add_site_metrics("cxr-1", 2, "site_a", 101, 40, {"loss": 0.9})
    registry.add_rejection("cxr-1", 2, "site_b", 202, ["x: 3 NaN/Inf value(s)"])
    registry.add_round("cxr-1", 2, status="complete", sites_asked=2, sites_accepted=1, seconds=1.0, bytes_sent=1,
                       bytes_received=1, metrics={})
    registry.finish_run("cxr-1")
    registry.start_run("cxr-2", "2", 1, {}, "h")
    registry.add_site_node("cxr-2", 1, "site_a", 111, 40)
    return registry


def test_sites_lists_node_site_rounds_and_last_seen(tmp_path, capsys):
    path = tmp_path / "registry.sqlite"
    registry = _two_site_registry(path)
    ended = {r["round"]: r["finished_at"] for r in registry.describe("cxr-1")["rounds"]}

    assert runs_main(["--registry", str(path), "sites", "--json", str(tmp_path / "sites.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["node", "id", "site"]
    table = {(cells[0], cells[1]): cells[2:] for cells in (line.split(maxsplit=5) for line in lines[1:])}
    assert set(table) == {("101", "site_a"), ("111", "site_a"), ("202", "site_b"), ("303", "-")}
    assert table[("101", "site_a")][:2] == ["2", "0"]            # rounds joined, rejected
    assert table[("202", "site_b")][:2] == ["1", "1"]
    assert table[("303", "-")][:2] == ["0", "1"]

    rows = {(r["node_id"], r["site"]): r for r in json.loads((tmp_path / "sites.json").read_text())}
    assert rows[("101", "site_a")]["last_seen"] == str(ended[2])   # site_a answered round 2
    assert rows[("202", "site_b")]["last_seen"] == str(ended[2])   # rejected, but it did answer
    assert rows[("303", "-")]["last_seen"] is None and rows[("303", "-")]["runs"] == ["cxr-1"]
    assert rows[("111", "site_a")]["runs"] == ["cxr-2"] and rows[("101", "site_a")]["runs"] == ["cxr-1"]

    assert runs_main(["--registry", str(path), "sites", "--run", "cxr-2"]) == 0
    assert [line.split()[:2] for line in capsys.readouterr().out.splitlines()[1:]] == [["111", "site_a"]]


def test_list_without_registry_names_where_it_looked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FEDCXR_REGISTRY", raising=False)
    monkeypatch.setattr("server.runs.running_superlinks", lambda: [])   # other tests' SuperLinks may be running
    assert runs_main(["list"]) == 2
    err = capsys.readouterr().err
    assert "no run registry found" in err
    assert str(tmp_path / "outputs" / "federation" / "registry.sqlite") in err
    assert "no flower-superlink process" in err
    assert not (tmp_path / "outputs").exists()          # looking creates nothing

    assert runs_main(["--registry", str(tmp_path / "nope.sqlite"), "list"]) == 2
    assert "no registry at" in capsys.readouterr().err and not (tmp_path / "nope.sqlite").exists()

    _two_site_registry(tmp_path / "elsewhere.sqlite")
    monkeypatch.setenv("FEDCXR_REGISTRY", str(tmp_path / "elsewhere.sqlite"))
    assert runs_main(["list"]) == 0
    captured = capsys.readouterr()
    assert "elsewhere.sqlite" in captured.err
    assert [line.split()[:2] for line in captured.out.splitlines()[1:]] == [["cxr-1", "finished"], ["cxr-2", "running"]]


def test_registry_found_beside_a_running_superlink(tmp_path, monkeypatch):
    """A SuperLink started in /srv/link with --database state/superlink.db: the ServerApp's relative default
    output folder lands in /srv/link, and docs/deployment.md's layout keeps runs/ beside the database."""
    link_dir, elsewhere = tmp_path / "link", tmp_path / "elsewhere"
    (link_dir / "state" / "runs").mkdir(parents=True)
    elsewhere.mkdir()
    script = tmp_path / "bin" / "flower-superlink"   # stands in for the console script: [python, .../flower-superlink]
    script.parent.mkdir()
    script.write_text("import time\ntime.sleep(60)\n")
    process = subprocess.Popen([sys.executable, str(script), "--database", "state/superlink.db"], cwd=link_dir)
    try:
        deadline = time.monotonic() + 10
        while not any(pid == process.pid for pid, _, _ in running_superlinks()) and time.monotonic() < deadline:
            time.sleep(0.1)
        (pid, cwd, database), = [entry for entry in running_superlinks() if entry[0] == process.pid]
        assert cwd == link_dir and database == link_dir / "state" / "superlink.db"
        monkeypatch.delenv("FEDCXR_REGISTRY", raising=False)
        mine = [entry for entry in running_superlinks() if entry[0] == process.pid]

        with pytest.raises(LookupError, match="--database folder"):
            find_registry(None, cwd=elsewhere, superlinks=mine)
        Registry(link_dir / "state" / "runs" / "registry.sqlite")
        assert find_registry(None, cwd=elsewhere, superlinks=mine) == str(link_dir / "state" / "runs" / "registry.sqlite")
        Registry(link_dir / "outputs" / "federation" / "registry.sqlite")
        with pytest.raises(LookupError, match="2 run registries found"):
            find_registry(None, cwd=elsewhere, superlinks=mine)
    finally:
        process.terminate()
        process.wait(timeout=10)
