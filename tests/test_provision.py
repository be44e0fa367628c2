"""`python -m server.provision` kits, and `client/run.py` stopping at once, with the fix, on a wrong CA or port."""
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from client.site import load_site
from server.provision import ProvisionError, certificate_names, main, provision

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _read(path: Path) -> bytes:
    return path.read_bytes()


def test_kits_hold_a_verifiable_certificate_keys_and_site_files(tmp_path):
    done = provision("cxr", "coord.example.org:9443", ["A", "B"], tmp_path / "kits", extra_names=["10.1.2.3"])
    kits = tmp_path / "kits"
    assert done["added"] == ["A", "B"] and done["superlink"] == "coord.example.org:9443"
    ca = x509.load_pem_x509_certificate(_read(kits / "ca" / "ca.crt"))
    server = x509.load_pem_x509_certificate(_read(kits / "coordinator" / "superlink.crt"))
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    # the SuperLink's internal processes dial 127.0.0.1: that IP must be in the SANs, not only the DNS name
    assert certificate_names(server) == {"coord.example.org", "10.1.2.3", "localhost", "127.0.0.1", "::1"}
    for private in [kits / "ca" / "ca.key", kits / "coordinator" / "superlink.key",
                    kits / "sites" / "A" / "node_key", kits / "sites" / "B" / "node_key"]:
        assert private.stat().st_mode & 0o777 == 0o600, private
    key = load_ssh_private_key(_read(kits / "sites" / "A" / "node_key"), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert _read(kits / "coordinator" / "nodes" / "A.pub") == _read(kits / "sites" / "A" / "node_key.pub")
    assert _read(kits / "sites" / "A" / "node_key.pub") != _read(kits / "sites" / "B" / "node_key.pub")

    site_path = kits / "sites" / "A" / "site.yaml"
    site = load_site(site_path, check_files=False)
    assert site["superlink"] == "coord.example.org:9443" and site["device"] == "auto"
    assert site["root_certificates"] == str(kits / "sites" / "A" / "ca.crt") and Path(site["root_certificates"]).is_file()
    assert site["node_private_key"] == str(kits / "sites" / "A" / "node_key")
    assert site["superexec_secret"].startswith(str(kits / "sites" / "A" / "state"))
    config = (kits / "coordinator" / "flwr-home" / "config.toml").read_text()
    assert '[superlink.cxr]' in config and 'address = "127.0.0.1:9443"' in config
    start = (kits / "coordinator" / "start_superlink.sh").read_text()
    assert "--enable-supernode-auth" in start and "--port 9443" in start and "--host 0.0.0.0" in start
    register = (kits / "coordinator" / "register_nodes.sh").read_text()
    assert "flwr supernode register" in register and '--name "$site"' in register
    assert (kits / "sites" / "A" / "README.md").is_file() and (kits / "coordinator" / "README.md").is_file()


def test_rerun_adds_a_site_without_rekeying_the_others(tmp_path):
    kits = tmp_path / "kits"
    provision("cxr", "127.0.0.1:9443", ["A", "B"], kits)
    before = {p: _read(p) for p in [kits / "ca" / "ca.key", kits / "coordinator" / "superlink.crt",
                                     kits / "sites" / "A" / "node_key", kits / "sites" / "B" / "node_key"]}
    (kits / "sites" / "A" / "site.yaml").write_text((kits / "sites" / "A" / "site.yaml").read_text() + "# edited\n")
    done = provision("cxr", "127.0.0.1:9443", ["C"], kits)
    assert done["added"] == ["C"] and done["sites"] == ["A", "B", "C"] and not done["superlink_certificate_reissued"]
    assert all(_read(p) == data for p, data in before.items())
    assert (kits / "sites" / "A" / "site.yaml").read_text().endswith("# edited\n")  # the hospital's edits stay
    assert sorted(p.name for p in (kits / "coordinator" / "nodes").iterdir()) == ["A.pub", "B.pub", "C.pub"]
    # a new name for the SuperLink re-issues its certificate only (same key, same CA: the kits stay valid)
    done = provision("cxr", "127.0.0.1:9443", ["C"], kits, extra_names=["10.9.9.9"])
    assert done["superlink_certificate_reissued"] and _read(kits / "ca" / "ca.key") == before[kits / "ca" / "ca.key"]
    assert "10.9.9.9" in certificate_names(x509.load_pem_x509_certificate(_read(kits / "coordinator" / "superlink.crt")))
    with pytest.raises(ProvisionError, match="holds federation"):
        provision("other", "127.0.0.1:9443", ["D"], kits)


@pytest.mark.parametrize("args, message", [
    (["--sites", "A,../x"], "not a valid name"),
    (["--sites", "A,A"], "each site once"),
    (["--superlink", "host:port"], "port must be a number"),
])
def test_bad_requests_are_refused_in_words(tmp_path, capsys, args, message):
    base = {"--federation": "cxr", "--superlink": "127.0.0.1:9443", "--sites": "A", "--out": str(tmp_path / "k")}
    base.update(dict(zip(args[::2], args[1::2])))
    assert main([x for kv in base.items() for x in kv]) == 2
    assert message in capsys.readouterr().err


def _serve(handler) -> tuple[int, threading.Event]:
    """A local server on a free port whose connections `handler(conn)` answers, until the event is set."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                try:
                    handler(conn)
                except OSError:
                    pass
        listener.close()

    threading.Thread(target=loop, daemon=True).start()
    return listener.getsockname()[1], stop


def _site_file(tmp_path: Path, kit: Path, port: int) -> Path:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    site = yaml.safe_load((kit / "site.yaml").read_text())
    site.update(superlink=f"127.0.0.1:{port}", state_dir=str(tmp_path / "state"),
                superexec_secret=str(tmp_path / "state" / "superexec.secret"),
                data={"root": str(data), "layout": "manifest", "index": False})
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(site))
    return path


def _run_site(site: Path, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(PROJECT_ROOT / "client" / "run.py"), "--site", str(site), *extra],
                          capture_output=True, text=True, timeout=60)
    return done, time.monotonic() - started


def test_a_superlink_signed_by_another_ca_stops_the_site_at_once(tmp_path):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    provision("cxr", "127.0.0.1:9443", ["A"], ours)
    provision("other", "127.0.0.1:9443", ["A"], theirs)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(theirs / "coordinator" / "superlink.crt", theirs / "coordinator" / "superlink.key")

    def handshake(conn):
        conn.settimeout(5)
        try:
            context.wrap_socket(conn, server_side=True).close()
        except ssl.SSLError:
            pass

    port, stop = _serve(handshake)
    try:
        for extra in ([], ["--dry-run"]):
            done, seconds = _run_site(_site_file(tmp_path, ours / "sites" / "A", port), *extra)
            assert done.returncode == 2 and seconds < 10, (seconds, done.stdout, done.stderr)
            assert "CERTIFICATE_VERIFY_FAILED" in done.stderr and "ca.crt of this federation's kit" in done.stderr
            assert "starting the SuperNode" not in done.stdout
    finally:
        stop.set()


def test_an_open_port_that_is_not_tls_stops_the_site_at_once(tmp_path):
    provision("cxr", "127.0.0.1:9443", ["A"], tmp_path / "kits")

    def plain_http(conn):
        conn.settimeout(5)
        conn.recv(1024)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    port, stop = _serve(plain_http)
    try:
        done, seconds = _run_site(_site_file(tmp_path, tmp_path / "kits" / "sites" / "A", port))
        assert done.returncode == 2 and seconds < 10, (seconds, done.stdout, done.stderr)
        assert "not with TLS (WRONG_VERSION_NUMBER)" in done.stderr and "flower-superlink --port" in done.stderr
    finally:
        stop.set()
