"""Startup kits for a federation: `python -m server.provision --federation NAME --superlink HOST[:PORT] --sites A,B
--out DIR` writes a CA, the SuperLink's certificate (every name and IP it is reached by in its SANs), the
coordinator's kit and one kit per site. TLS and node keys are right by construction; re-running adds sites and
keeps every existing key, certificate and site file.

    DIR/ca/                 ca.key (keep offline), ca.crt
    DIR/coordinator/        ca.crt, superlink.crt, superlink.key, start_superlink.sh, register_nodes.sh,
                            flwr-home/config.toml, nodes/<site>.pub, README.md
    DIR/sites/<site>/       ca.crt, node_key, node_key.pub, site.yaml, README.md
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

DEFAULT_PORT = 8000  # flower-superlink's own default
# The SuperLink's internal processes (SuperExec, ServerApp) dial 127.0.0.1: without these SANs they fail the
# handshake and no run ever starts, while the SuperLink keeps listening.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MANIFEST = "federation.json"
CURVE = ec.SECP384R1  # flwr's node auth wants an EC key on a NIST curve, in OpenSSH format


class ProvisionError(ValueError):
    """The request cannot be provisioned as asked (bad name, conflicting earlier kit)."""


def parse_superlink(text: str) -> tuple[str, int]:
    host, port = text, DEFAULT_PORT
    if text.startswith("["):  # [IPv6]:port
        host, _, rest = text[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else DEFAULT_PORT
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        if not port_text.isdigit():
            raise ProvisionError(f"--superlink {text!r}: the port must be a number (HOST[:PORT])")
        port = int(port_text)
    if not host or not 0 < port < 65536:
        raise ProvisionError(f"--superlink {text!r}: expected HOST[:PORT] with a port in 1-65535")
    return host, port


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def superlink_names(host: str, extra: list[str]) -> list[str]:
    """Every name the SuperLink is reached by: the sites' address, any extra name or IP, and the loopback names."""
    names = []
    for name in [host, *extra, *LOOPBACK_NAMES]:
        if name and name not in names:
            names.append(name)
    return names


def write_private(path: Path, data: bytes) -> None:
    """Create `path` with mode 0600 from the start (never readable by others, even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certificate(subject: str, issuer: x509.Name | None, public_key, signer, days: int, ca: bool,
                 names: list[str] = ()) -> x509.Certificate:
    now = datetime.now(timezone.utc)
    subject_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(subject_name).issuer_name(issuer or subject_name)
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                                        critical=True)
    else:
        builder = builder.add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return builder.sign(signer, hashes.SHA384())


def ensure_ca(folder: Path, federation: str, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "ca.key").is_file():
        key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), password=None)
        return key, x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
    key = ec.generate_private_key(CURVE())
    cert = _certificate(f"{federation} federation CA", None, key.public_key(), key, days, ca=True)
    write_private(folder / "ca.key", _pem_key(key))
    (folder / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def certificate_names(cert: x509.Certificate) -> set[str]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(n) for n in sans.get_values_for_type(x509.DNSName)} | {
        str(n) for n in sans.get_values_for_type(x509.IPAddress)}


def ensure_superlink_certificate(folder: Path, ca_key, ca_cert: x509.Certificate, names: list[str], days: int) -> bool:
    """The SuperLink's key and certificate, re-issued (same key, same CA) when a name is missing from its SANs;
    True if it was (re)written. Site kits hold only the CA, so they stay valid."""
    cert_path, key_path = folder / "superlink.crt", folder / "superlink.key"
    if key_path.is_file():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if cert_path.is_file() and set(names) <= certificate_names(x509.load_pem_x509_certificate(cert_path.read_bytes())):
            return False
    else:
        key = ec.generate_private_key(CURVE())
        write_private(key_path, _pem_key(key))
    cert = _certificate(names[0], ca_cert.subject, key.public_key(), ca_key, days, ca=False, names=names)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return True


def ensure_node_key(kit: Path) -> bytes:
    """The site's node key pair (created once); its OpenSSH public key."""
    if not (kit / "node_key").is_file():
        key = ec.generate_private_key(CURVE())
        write_private(kit / "node_key", key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.OpenSSH,
                                                          serialization.NoEncryption()))
        (kit / "node_key.pub").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return (kit / "node_key.pub").read_bytes()


def site_document(name: str, superlink: str, kit_home: Path) -> dict:
    """The site file a kit starts with: load_site accepts it once data.root points at the site's data."""
    return {
        "name": name,
        "data": {"root": f"/data/fedcxr/{name}", "layout": "mimic_cxr"},
        "state_dir": str(kit_home / "state"),
        "superlink": superlink,
        "root_certificates": str(kit_home / "ca.crt"),
        "node_private_key": str(kit_home / "node_key"),
        "superexec_secret": str(kit_home / "state" / "superexec.secret"),
        "trusted_entities": None,
        "supernode_port": 9094,
        "clientapp_launcher": "warm",
        "device": "auto",
        "threads": None,
        "public_patient_count": None,
        "privacy": {"max_epsilon": 8.0, "max_delta": 1.0e-5},
        # what this site accepts from any run (client/policy.py): patient-level DP-SGD every round, a noise floor
        "policy": {"require": ["dpsgd"], "min_noise_multiplier": 0.5, "accepted_models": None,
                   "accepted_objectives": None},
    }


SITE_HEADER = """\
# Site {name} of federation {federation}, written by `python -m server.provision`. Read by
# `python client/run.py --site {path}`. Edit data.root (and data.layout) to point at this hospital's data and
# public_patient_count (the rounded patient count DP-SGD publishes); review privacy and policy (configs/site/A.yaml
# explains each key). Everything else works as written if the kit stays in {home}; moved: change the paths.
"""


def write_site_kit(kit: Path, name: str, federation: str, superlink: str, ca_pem: bytes, home: Path) -> bool:
    """One site's kit; True if its site file was written now (an existing one is the hospital's and is kept)."""
    kit.mkdir(parents=True, exist_ok=True)
    (kit / "ca.crt").write_bytes(ca_pem)
    ensure_node_key(kit)
    site_path = kit / "site.yaml"
    new = not site_path.exists()
    if new:
        header = SITE_HEADER.format(name=name, federation=federation, path=home / "site.yaml", home=home)
        site_path.write_text(header + yaml.safe_dump(site_document(name, superlink, home), sort_keys=False))
    (kit / "README.md").write_text(SITE_README.format(name=name, federation=federation, superlink=superlink, home=home))
    return new


def write_coordinator_kit(kit: Path, federation: str, host: str, port: int, sites: list[str], out: Path,
                          ca_pem: bytes) -> None:
    (kit / "nodes").mkdir(parents=True, exist_ok=True)
    (kit / "ca.crt").write_bytes(ca_pem)
    for site in sites:
        (kit / "nodes" / f"{site}.pub").write_bytes((out / "sites" / site / "node_key.pub").read_bytes())
    listen = "127.0.0.1" if host in LOOPBACK_NAMES else "0.0.0.0"
    start = kit / "start_superlink.sh"
    start.write_text(START_SUPERLINK.format(federation=federation, host=listen, port=port))
    register = kit / "register_nodes.sh"
    register.write_text(REGISTER_NODES.format(federation=federation))
    home = kit / "flwr-home"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{federation}"\n\n[superlink.{federation}]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{kit.resolve() / "ca.crt"}"\n')
    for script in (start, register):
        script.chmod(0o755)
    (kit / "README.md").write_text(COORDINATOR_README.format(federation=federation, host=host, port=port,
                                                             sites=", ".join(sites), out=out))


def provision(federation: str, superlink: str, sites: list[str], out: Path, extra_names: list[str] = (),
              install_dir: Path | None = None, days: int = 825) -> dict:
    """Write (or extend) the kits under `out`; a summary of what was created."""
    for name in [federation, *sites]:
        if not NAME.match(name):
            raise ProvisionError(f"{name!r} is not a valid name: letters, digits and ._- (at most 64, starting "
                                 "with a letter or digit)")
    if not sites or len(set(sites)) != len(sites):
        raise ProvisionError(f"--sites must list each site once, got {sites}")
    host, port = parse_superlink(superlink)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    out = Path(out).resolve()
    manifest_path = out / MANIFEST
    known: list[str] = []
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest["federation"] != federation or manifest["superlink"] != address:
            raise ProvisionError(f"{out} holds federation {manifest['federation']!r} at {manifest['superlink']}; "
                                 f"use another --out for {federation!r} at {address}")
        known = manifest["sites"]
        extra_names = [*manifest.get("names", []), *extra_names]
    out.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = ensure_ca(out / "ca", federation, days)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    names = superlink_names(host, list(extra_names))
    coordinator = out / "coordinator"
    coordinator.mkdir(exist_ok=True)
    reissued = ensure_superlink_certificate(coordinator, ca_key, ca_cert, names, days)
    all_sites = [*known, *[s for s in sites if s not in known]]
    added = []
    for site in all_sites:
        home = (Path(install_dir) / site) if install_dir else out / "sites" / site
        if write_site_kit(out / "sites" / site, site, federation, address, ca_pem, home):
            added.append(site)
    write_coordinator_kit(coordinator, federation, host, port, all_sites, out, ca_pem)
    manifest_path.write_text(json.dumps({"federation": federation, "superlink": address, "sites": all_sites,
                                         "names": names}, indent=2) + "\n")
    return {"federation": federation, "superlink": address, "names": names, "sites": all_sites, "added": added,
            "superlink_certificate_reissued": reissued}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.provision", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--federation", required=True, help="the federation's name (the flwr connection name)")
    parser.add_argument("--superlink", required=True, help=f"HOST[:PORT] the sites dial (port {DEFAULT_PORT} if left out)")
    parser.add_argument("--sites", required=True, help="comma-separated site names, e.g. A,B,C")
    parser.add_argument("--out", required=True, type=Path, help="folder of the kits (re-run on it to add sites)")
    parser.add_argument("--san", action="append", default=[], help="another DNS name or IP the SuperLink is "
                        "reached by (repeatable); localhost and 127.0.0.1 are always in")
    parser.add_argument("--install-dir", type=Path, default=None, help="where each hospital unpacks its kit "
                        "(<install-dir>/<site>); the site files' paths point there. Default: the kit folders here")
    parser.add_argument("--days", type=int, default=825, help="certificate lifetime in days")
    args = parser.parse_args(argv)
    try:
        done = provision(args.federation, args.superlink, [s.strip() for s in args.sites.split(",") if s.strip()],
                         args.out, args.san, args.install_dir, args.days)
    except (ProvisionError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out.resolve()
    print(f"federation {done['federation']}: SuperLink {done['superlink']} (certificate names: "
          f"{', '.join(done['names'])}{'; re-issued' if done['superlink_certificate_reissued'] else ''})")
    print(f"sites: {', '.join(done['sites'])} (new: {', '.join(done['added']) or 'none'})")
    print(f"coordinator: {out / 'coordinator'}/start_superlink.sh, then register_nodes.sh; "
          f"site kits: {out / 'sites'}/<site> (send each hospital its folder); keep {out / 'ca'} offline")
    return 0


START_SUPERLINK = """\
#!/bin/sh
# The {federation} SuperLink: TLS with this kit's certificate, only registered node keys may connect.
# FEDCXR_STATE (default /var/lib/fedcxr) holds its database; extra flower-superlink options follow "$@".
KIT=$(cd "$(dirname "$0")" && pwd)
STATE=${{FEDCXR_STATE:-/var/lib/fedcxr}}
mkdir -p "$STATE"
export FLWR_HOME=${{FLWR_HOME:-$STATE/flwr}}   # where the SuperLink installs app bundles
exec flower-superlink \\
  --ssl-ca-certfile "$KIT/ca.crt" --ssl-certfile "$KIT/superlink.crt" --ssl-keyfile "$KIT/superlink.key" \\
  --enable-supernode-auth --database "$STATE/superlink.db" --disable-runtime-dependency-installation \\
  --host {host} --port {port} "$@"
"""

REGISTER_NODES = """\
#!/bin/sh
# Register the sites' node keys with the running {federation} SuperLink (all of them, or the sites named as
# arguments). A key already registered is reported and skipped. Run on the coordinator.
KIT=$(cd "$(dirname "$0")" && pwd)
export FLWR_HOME=${{FLWR_HOME:-$KIT/flwr-home}}
cd "$FLWR_HOME"   # not a folder holding a {federation}/ folder: flwr would take it for an app
status=0
if [ "$#" -eq 0 ]; then set -- $(cd "$KIT/nodes" && ls *.pub | sed 's/\\.pub$//'); fi
for site in "$@"; do
  # flwr exits 0 even when it fails with --format json: read its answer
  out=$(flwr supernode register "$KIT/nodes/$site.pub" {federation} --name "$site" --format json 2>&1)
  if echo "$out" | grep -q '"success": true'; then
    echo "$site: registered, $(echo "$out" | grep -o '"node-id": [0-9]*')"
  elif echo "$out" | grep -qi "already in use"; then
    echo "$site: already registered"
  else
    echo "$site: registration failed: $out" >&2; status=1
  fi
done
exit $status
"""

COORDINATOR_README = """\
# Coordinator kit of federation {federation}

Written by `python -m server.provision`; re-run it with `--out {out}` and more `--sites` to add hospitals
(existing keys, certificates and site files are kept).

| file | what |
|---|---|
| `ca.crt` | the federation CA (its key is in `{out}/ca/ca.key`: keep it offline) |
| `superlink.crt`, `superlink.key` | the SuperLink's TLS certificate (names: {host}, localhost, 127.0.0.1) and key (mode 0600) |
| `start_superlink.sh` | `flower-superlink` with TLS, node authentication and a persistent database, port {port} |
| `register_nodes.sh` | registers every site's public key in `nodes/` (or the sites named as arguments) |
| `flwr-home/config.toml` | the `flwr` connection `{federation}` (127.0.0.1:{port}, this CA); `export FLWR_HOME=<this folder>/flwr-home` |

Sites: {sites}.

    FEDCXR_STATE=/var/lib/fedcxr ./start_superlink.sh &
    ./register_nodes.sh
    export FLWR_HOME=$PWD/flwr-home
    flwr supernode ls {federation}

Keep the SuperLink's Control API off the hospitals' network (docs/deployment.md).
"""

SITE_README = """\
# Site kit: {name} in federation {federation}

| file | what |
|---|---|
| `site.yaml` | this site's file: SuperLink `{superlink}`, CA, node key, privacy caps, `device: auto` |
| `ca.crt` | the federation CA: the SuperNode trusts the SuperLink's certificate through it |
| `node_key`, `node_key.pub` | this site's node key pair (mode 0600; the coordinator registered the public key) |
| `state/` | created on first start: local state, the ledger, `superexec.secret` (mode 0600) |

1. Put this folder at `{home}` (or change the paths in `site.yaml`).
2. In `site.yaml` set `data.root` (and `data.layout`) to this hospital's data and `public_patient_count` (the
   rounded patient count DP-SGD publishes); review `privacy` (epsilon/delta caps) and `policy` (DP-SGD required,
   noise floor, accepted models): a run can only tighten them.
3. `python client/run.py --site {home}/site.yaml --dry-run` checks the site file, the TLS handshake against
   `ca.crt`, that the address speaks Flower's Fleet API and that this key is registered; then drop `--dry-run`.
   A permanent failure (wrong CA, wrong port, key not registered) stops it at once with the fix in one line.

The SuperExec secret (`state/superexec.secret`) is made on first start: only the site's own ClientApp launcher
may take training tasks from the SuperNode's local runtime API.
"""


if __name__ == "__main__":
    sys.exit(main())
