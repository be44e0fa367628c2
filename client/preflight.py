"""What a site checks before it runs its SuperNode, and how it reads the SuperNode's failures: the SuperLink's TLS
certificate against the federation CA, that the port speaks Flower's Fleet API, that the node key is registered.

A permanent failure (wrong CA, wrong port, unregistered key) raises PermanentError with the fix in one line:
retrying cannot help. Anything else that fails (the SuperLink down or restarting) is transient.
"""
from __future__ import annotations

import socket
import ssl
import sys
from pathlib import Path

from client.site import SiteConfigError


class PermanentError(SiteConfigError):
    """Retrying cannot help: the message names the fix."""


class TransientError(RuntimeError):
    """The SuperLink could not be asked now (down, restarting, overloaded)."""


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError as err:
        raise PermanentError(f"superlink {address!r} is not host:port; fix: set superlink: in the site file") from err


def not_tls(address: str) -> PermanentError:
    return PermanentError(f"{address} answers, but not with TLS (WRONG_VERSION_NUMBER): it is not the SuperLink's "
                          "port; fix: set superlink: in the site file to the port flower-superlink --port listens on")


def wrong_certificate(address: str, ca: str, why: str) -> PermanentError:
    if "mismatch" in why.lower():
        fix = (f"re-provision the SuperLink certificate with this name (python -m server.provision ... --san "
               f"{split_address(address)[0]}) or dial a name it has")
    else:
        fix = "root_certificates must be the ca.crt of this federation's kit (this SuperLink's was signed by another CA)"
    return PermanentError(f"the SuperLink at {address} has a certificate {ca} does not accept "
                          f"(CERTIFICATE_VERIFY_FAILED: {why}); fix: {fix}")


def unregistered(site: dict) -> PermanentError:
    pub = f"{site['node_private_key']}.pub"
    return PermanentError(f"the SuperLink does not know this site's node key {site['node_private_key']}; fix: on the "
                          f"coordinator, register_nodes.sh {site['name']} (or flwr supernode register {pub} "
                          f"<federation> --name {site['name']})")


def check_tls(address: str, ca: str, timeout_s: float = 10.0) -> None:
    """A TLS handshake with the SuperLink, verified against the CA and the address's name."""
    host, port = split_address(address)
    context = ssl.create_default_context(cafile=ca)
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw:
            with context.wrap_socket(raw, server_hostname=host):
                pass
    except ssl.SSLCertVerificationError as err:
        raise wrong_certificate(address, ca, err.verify_message or str(err)) from err
    except ssl.SSLError as err:
        if "WRONG_VERSION_NUMBER" in str(err) or "record layer failure" in str(err):
            raise not_tls(address) from err
        raise TransientError(f"TLS handshake with {address} failed: {err}") from err
    except OSError as err:  # refused, reset, timed out
        raise TransientError(f"SuperLink at {address} is unreachable ({err})") from err


def _fleet_client(site: dict):
    """A Fleet API client that signs with the site's node key, and that key."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    try:
        key = load_ssh_private_key(Path(site["node_private_key"]).read_bytes(), password=None)
    except (OSError, ValueError) as err:
        raise PermanentError(f"node_private_key {site['node_private_key']} is not an OpenSSH private key ({err}); "
                             "fix: use the node_key of this site's kit (or ssh-keygen -t ecdsa -b 384)") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PermanentError(f"node_private_key {site['node_private_key']} is not an EC key; fix: use the node_key "
                             "of this site's kit (or ssh-keygen -t ecdsa -b 384)")
    client = FleetHttpClient.from_server_address(
        str(site["superlink"]), False, site["root_certificates"],
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperNode"),
                      NodeAuthHttpInterceptor(key, key.public_key())])
    return client, key


def check_node(site: dict) -> str:
    """Whether the SuperLink knows this site's node key, asked without changing anything: an activation request
    with a heartbeat interval of 0. The SuperLink (flwr 1.41) looks the key up first, then checks the interval, so
    a registered key is answered "invalid heartbeat interval" (code 2003) and an unknown one "failed to activate"
    (2004); either way no node goes online. A plain activation could not tell: an unknown key and a node still
    held online both get 2004. Also proves the port is Flower's Fleet API. Returns what it learned, in words."""
    client, key = _fleet_client(site)
    try:
        return _probe_registration(client, key, site)
    finally:
        client.close()


def _probe_registration(client, key, site: dict) -> str:
    import httpx
    from flwr.proto.fleet_pb2 import ActivateNodeRequest, DeactivateNodeRequest
    from flwr.supercore.error import FlowerError
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    address = str(site["superlink"])
    try:
        reply = client.ActivateNode(ActivateNodeRequest(public_key=public_key_to_bytes(key.public_key()),
                                                        heartbeat_interval=0))
    except httpx.HTTPStatusError as err:
        status = err.response.status_code
        error = FlowerError.from_json(err.response.text)
        code = int(error.code) if error is not None else None
        if code == 2003:
            return "node key registered"
        if code == 2004:
            raise unregistered(site) from err
        if status in (404, 405):
            raise PermanentError(f"{address} speaks HTTPS but is not Flower's Fleet API (HTTP {status}); fix: set "
                                 "superlink: to the port flower-superlink --port listens on") from err
        if status == 401:
            raise PermanentError(f"the SuperLink refused this node's signed request (HTTP 401); fix: check this "
                                 "machine's clock and that node_private_key is this site's kit key") from err
        detail = error.message if error is not None else err.response.text[:200]
        raise TransientError(f"the SuperLink answered HTTP {status}: {detail}") from err
    except httpx.HTTPError as err:
        if "CERTIFICATE_VERIFY_FAILED" in str(err):
            raise wrong_certificate(address, site["root_certificates"], str(err)) from err
        if "WRONG_VERSION_NUMBER" in str(err):
            raise not_tls(address) from err
        raise TransientError(f"SuperLink at {address}: {err}") from err
    # A SuperLink that took interval 0 has activated the node: undo that.
    try:
        client.DeactivateNode(DeactivateNodeRequest(node_id=reply.node_id))
    except httpx.HTTPError:
        pass
    return f"node key registered (node id {reply.node_id})"


def deactivate_node(site: dict, node_id: int | None) -> None:
    """Tell the SuperLink this site's node is offline (what a SuperNode does when it exits cleanly)."""
    import httpx
    from flwr.proto.fleet_pb2 import DeactivateNodeRequest

    if node_id is None:
        return
    try:
        client, _ = _fleet_client(site)
        try:
            client.DeactivateNode(DeactivateNodeRequest(node_id=node_id))
        finally:
            client.close()
    except httpx.HTTPStatusError as err:
        if err.response.status_code != 412:  # 412: already offline (the SuperNode said so before it was killed)
            print(f"warning: could not mark node {node_id} offline at the SuperLink ({err}); it lapses after its "
                  "heartbeats", file=sys.stderr, flush=True)
    except (httpx.HTTPError, SiteConfigError, OSError) as err:
        print(f"warning: could not mark node {node_id} offline at the SuperLink ({err}); it lapses after its "
              "heartbeats", file=sys.stderr, flush=True)


def check_superlink(site: dict) -> str:
    """Every check, in order; what the last one learned. Raises PermanentError or TransientError."""
    check_tls(str(site["superlink"]), site["root_certificates"])
    return check_node(site)


# What the SuperNode logs for the failures above (it exits 1 for all of them; only its log names the reason). An
# unknown key is logged as "Failed to activate SuperNode", as is a node still held online: check_node tells them apart.
PERMANENT_LOG_MARKS = {
    "CERTIFICATE_VERIFY_FAILED": lambda site, line: wrong_certificate(str(site["superlink"]), site["root_certificates"],
                                                                      line.strip()[-200:]),
    "WRONG_VERSION_NUMBER": lambda site, line: not_tls(str(site["superlink"])),
}


def permanent_failure(site: dict, line: str) -> PermanentError | None:
    """The permanent failure a SuperNode log line reports, if any."""
    for mark, error in PERMANENT_LOG_MARKS.items():
        if mark in line:
            return error(site, line)
    return None
