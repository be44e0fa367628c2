"""Test-only ClientApp (copied into the test's app bundle, never shipped): the real one, plus a mod that spoils
a site's train replies when its site file says so, e.g. `faults: {"1": nan, "2": shape}` (round -> fault)."""
import numpy as np
from flwr.app import Array, ArrayRecord, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp

from client.app import audit_outgoing, query, site_of, train
from client.site import SCHEMA

SCHEMA.setdefault("faults", None)  # this app's own site-file key (load_site refuses keys it does not know)


def _spoil(arrays: dict[str, np.ndarray], fault: str) -> dict[str, np.ndarray]:
    name = next(k for k in sorted(arrays) if np.issubdtype(arrays[k].dtype, np.floating))
    if fault == "nan":
        arrays[name] = np.full_like(arrays[name], np.nan)
    elif fault == "shape":
        arrays[name] = np.zeros((*arrays[name].shape, 2), arrays[name].dtype)
    else:
        raise ValueError(f"unknown fault {fault!r}")
    return arrays


def spoil_reply(message: Message, context, call_next) -> Message:
    reply = call_next(message, context)
    faults = site_of(context).get("faults") or {}
    fault = faults.get(str(message.content["config"]["round"])) if message.metadata.message_type == MessageType.TRAIN else None
    if fault is None or reply.has_error():
        return reply
    arrays = _spoil({k: a.numpy() for k, a in reply.content["arrays"].items()}, fault)
    content = RecordDict({k: v for k, v in reply.content.items() if k != "arrays"})
    content["arrays"] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return Message(content, reply_to=message)


app = ClientApp(mods=[audit_outgoing, spoil_reply])  # audit outermost: it records what really left the site
app.train()(train)
app.query()(query)
