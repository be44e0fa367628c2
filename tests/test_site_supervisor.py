"""`client/run.py` supervises the SuperNode: restarts it after a refused activation, passes signals on, gives up."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from client.run import RESTARTABLE, supervise

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _fake_supernode(tmp_path: Path, failures: int, then: int) -> list[str]:
    """A command that logs Flower's restartable exit and exits 1 (as the SuperNode does) on its first `failures`
    starts, then exits `then`; it counts its starts."""
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        count = Path({str(tmp_path / 'starts')!r})
        starts = int(count.read_text()) + 1 if count.exists() else 1
        count.write_text(str(starts))
        if starts <= {failures}:
            print("ERROR: {RESTARTABLE}")
            sys.exit(1)
        print("a SuperNode that ran")
        sys.exit({then})
    """)
    return [sys.executable, "-c", script]


def test_refused_activations_are_retried_until_the_supernode_runs(tmp_path, capsys):
    code = supervise(_fake_supernode(tmp_path, failures=2, then=0), dict(os.environ), delays=(0.01, 0.01, 0.01))
    assert code == 0
    assert (tmp_path / "starts").read_text() == "3"
    out = capsys.readouterr().out
    assert out.count(f"ERROR: {RESTARTABLE}") == 2 and out.count("restarting in 0.01 s") == 2 and "attempt 3 of 4" in out
    assert "a SuperNode that ran" in out  # the child's output is passed on


def test_supervisor_gives_up_after_its_delays_with_the_supernode_exit_code(tmp_path, capsys):
    code = supervise(_fake_supernode(tmp_path, failures=99, then=0), dict(os.environ), delays=(0.01, 0.01))
    assert code == 1
    assert (tmp_path / "starts").read_text() == "3"  # the first start and one per delay
    assert "flwr supernode register" in capsys.readouterr().err


def test_a_permanent_failure_in_the_log_is_not_retried(tmp_path, capsys):
    """A wrong CA also exits with the restartable code: the log line says it is permanent."""
    from client.preflight import permanent_failure

    script = ('print("ERROR: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer");'
              f'print("ERROR: {RESTARTABLE}"); import sys; open({str(tmp_path / "starts")!r}, "a").write("x"); sys.exit(1)')
    site = {"name": "A", "node_private_key": "/keys/node_key", "superlink": "h:1", "root_certificates": "/kit/ca.crt"}
    code = supervise([sys.executable, "-c", script], dict(os.environ), delays=(0.01,) * 5,
                     classify=lambda line: permanent_failure(site, line))
    assert code == 1 and (tmp_path / "starts").read_text() == "x"  # one start, no restart
    err = capsys.readouterr().err
    assert "CERTIFICATE_VERIFY_FAILED" in err and "root_certificates must be the ca.crt of this federation's kit" in err


def test_a_refused_activation_of_an_unknown_key_is_not_retried(tmp_path, capsys):
    """An unknown key and a node still held online both log 'Failed to activate': the recheck tells them apart."""
    from client.preflight import unregistered

    site = {"name": "C", "node_private_key": "/keys/node_key"}
    asked = []

    def recheck():
        asked.append(1)
        if len(asked) == 2:  # the first refusal was a session still held online; then the key is unregistered
            raise unregistered(site)

    code = supervise(_fake_supernode(tmp_path, failures=99, then=0), dict(os.environ), delays=(0.01,) * 5,
                     recheck=recheck)
    assert code == 1 and (tmp_path / "starts").read_text() == "2" and len(asked) == 2
    assert "register_nodes.sh C" in capsys.readouterr().err


def test_other_exit_codes_are_not_retried(tmp_path):
    assert supervise(_fake_supernode(tmp_path, failures=0, then=2), dict(os.environ), delays=(0.01,)) == 2
    assert (tmp_path / "starts").read_text() == "1"


def test_sigterm_reaches_the_supernode_and_stops_the_supervisor(tmp_path):
    stopped = tmp_path / "child_got_sigterm"
    child = textwrap.dedent(f"""
        import signal, sys, time
        from pathlib import Path
        def bye(*_):
            Path({str(stopped)!r}).write_text("yes")
            sys.exit(0)
        signal.signal(signal.SIGTERM, bye)
        Path({str(tmp_path / 'child_ready')!r}).write_text("ready")
        time.sleep(120)
    """)
    wrapper = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(PROJECT_ROOT)!r})
        from client.run import supervise
        sys.exit(supervise([sys.executable, "-c", {child!r}], dict(os.environ), delays=(0.01,)))
    """)
    proc = subprocess.Popen([sys.executable, "-c", wrapper])
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "child_ready").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "the supervised child did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0  # the child's own exit code, not a restart
        assert stopped.read_text() == "yes"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_supernode_slow_to_exit_is_killed_after_the_grace_and_its_node_marked_offline(tmp_path):
    """Flower's SuperNode needs ~5 s to exit after SIGTERM; the site stops within ~1 s and deactivates the node."""
    child = textwrap.dedent(f"""
        import signal, time
        from pathlib import Path
        signal.signal(signal.SIGTERM, lambda *_: None)  # as slow as it likes
        print("INFO: SuperNode ID: 4242", flush=True)
        Path({str(tmp_path / 'child_ready')!r}).write_text("ready")
        time.sleep(120)
    """)
    wrapper = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        sys.path.insert(0, {str(PROJECT_ROOT)!r})
        from client.run import supervise
        code = supervise([sys.executable, "-c", {child!r}], dict(os.environ), delays=(0.01,), stop_grace_s=0.5,
                         after_kill=lambda node: Path({str(tmp_path / 'deactivated')!r}).write_text(str(node)))
        sys.exit(code)
    """)
    proc = subprocess.Popen([sys.executable, "-c", wrapper])
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "child_ready").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "the supervised child did not start"
            time.sleep(0.05)
        time.sleep(0.3)  # the node id line has been read
        asked = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - asked < 2.5
        assert (tmp_path / "deactivated").read_text() == "4242"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_site_file_restart_delays_are_checked(tmp_path):
    import pytest
    import yaml

    from client.site import SiteConfigError, load_site

    site = {"name": "A", "data": {"root": str(tmp_path), "layout": "manifest"}, "superlink": "127.0.0.1:9092",
            "root_certificates": "ca.crt", "node_private_key": "key", "state_dir": str(tmp_path),
            "privacy": {"max_epsilon": 8.0, "max_delta": 1e-5}}
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(dict(site, restart_delays_s=[1, 2.5])))
    assert load_site(tmp_path / "ok.yaml", check_files=False)["restart_delays_s"] == [1, 2.5]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(dict(site, restart_delays_s=[5, -1])))
    with pytest.raises(SiteConfigError, match="restart_delays_s"):
        load_site(tmp_path / "bad.yaml", check_files=False)


def test_site_file_chooses_how_clientapps_start(tmp_path):
    import pytest
    import yaml

    from client.run import launcher_command, supernode_command
    from client.site import SiteConfigError, load_site

    site = {"name": "A", "data": {"root": str(tmp_path), "layout": "manifest"}, "superlink": "127.0.0.1:9092",
            "root_certificates": "ca.crt", "node_private_key": "key", "state_dir": str(tmp_path),
            "privacy": {"max_epsilon": 8.0, "max_delta": 1e-5}, "supernode_port": 9111}
    (tmp_path / "warm.yaml").write_text(yaml.safe_dump(site))
    warm = load_site(tmp_path / "warm.yaml", check_files=False)
    command, _ = supernode_command(warm, tmp_path / "warm.yaml")
    assert command[command.index("--isolation") + 1] == "process"
    secret = tmp_path / "superexec.secret"
    assert command[command.index("--superexec-auth-secret-file") + 1] == str(secret)
    assert (secret.stat().st_mode & 0o777) == 0o600 and len(secret.read_bytes()) == 64
    launcher = launcher_command(warm)
    assert launcher[1].endswith("client/clientapp_launcher.py") and "127.0.0.1:9111" in launcher
    assert launcher[launcher.index("--superexec-secret-file") + 1] == str(secret)

    # Flower's own SuperExec also takes the tasks with the secret (its subprocess mode would ignore one).
    (tmp_path / "flower.yaml").write_text(yaml.safe_dump(dict(site, clientapp_launcher="flower")))
    flower = load_site(tmp_path / "flower.yaml", check_files=False)
    before = secret.read_bytes()
    command = supernode_command(flower, tmp_path / "flower.yaml")[0]
    assert command[command.index("--isolation") + 1] == "process" and secret.read_bytes() == before  # re-used
    launcher = launcher_command(flower)
    assert launcher[0].endswith("flower-superexec") and launcher[launcher.index("--superexec-auth-secret-file") + 1] == str(secret)

    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(dict(site, clientapp_launcher="hot")))
    with pytest.raises(SiteConfigError, match="clientapp_launcher must be one of"):
        load_site(tmp_path / "bad.yaml", check_files=False)


def test_a_secret_others_can_read_is_refused(tmp_path):
    import pytest

    from client.run import superexec_secret
    from client.site import SiteConfigError

    secret = superexec_secret({"state_dir": str(tmp_path / "state")})
    secret.chmod(0o644)
    with pytest.raises(SiteConfigError, match="chmod 600"):
        superexec_secret({"state_dir": str(tmp_path / "state")})


def test_launcher_imports_the_ml_stack_but_none_of_the_project():
    """A `client` package imported before the fork would shadow the run's app bundle in every ClientApp."""
    script = Path(__file__).resolve().parents[1] / "client" / "clientapp_launcher.py"
    probe = (f"import runpy, sys; sys.argv = [{str(script)!r}]; "
             f"ns = runpy.run_path({str(script)!r}, run_name='launcher'); ns['preload'](); "
             "print(sorted({m.partition('.')[0] for m in sys.modules} & (ns['PROJECT_PACKAGES'] | {'torch', 'timm'})))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                         cwd="/", env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['timm', 'torch']"
