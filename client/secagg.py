"""The site's side of SecAgg+ (privacy=secagg): Flower's secaggplus_mod runs the protocol, this module trains.

Only the collect stage trains: Flower hands it the round's fit instructions in its legacy form (unnamed arrays
whose names travel in the config); the site trains as in any round and answers with its change to the global
floating-point parameters and its example count, which the mod masks before anything leaves.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from shared_models.transfer import SECAGG_MAX_WEIGHT_KEY, SECAGG_NAMES_KEY, contiguous, decode_arrays

TrainContent = Callable[[RecordDict, Context], "RecordDict | Error"]


class SecureRoundRefused(RuntimeError):
    """The site cannot take part in this SecAgg+ round; the message names the setting to change."""


def is_secure_round(message: Message) -> bool:
    return message.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in message.content.config_records


def masked_change(global_params: dict[str, np.ndarray], reply: RecordDict, names: list[str],
                  max_weight: float) -> FitRes:
    """The legacy FitRes the mod masks: the site's change in the travelling order, its examples, its metrics."""
    new = decode_arrays({name: array.numpy() for name, array in reply["arrays"].items()})
    missing = sorted(set(names) - set(new))
    if missing:
        raise SecureRoundRefused(f"this site's shared parameters lack {missing[:5]}: its model config differs")
    metrics = dict(reply["metrics"])
    examples = max(1, round(metrics.pop("examples")))   # a DP round's weight is its expected examples (a float)
    if examples > max_weight:
        raise SecureRoundRefused(f"this site weighs its update with {examples} examples, above SecAgg+'s max_weight "
                                 f"{max_weight:g}: raise privacy.secagg.max_weight to at least the largest site's")
    change = [np.asarray(new[n], np.float64) - np.asarray(global_params[n], np.float64) for n in names]
    from client.privacy.disclosure import clear_metrics   # here: opacus (behind client.privacy) is slow to import

    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(change), examples,
                  {**clear_metrics(metrics), "site": str(reply["site"]["name"])})


def secure_aggregation(train_content: TrainContent):
    """A ClientApp mod: SecAgg+ messages go through Flower's secaggplus_mod with `train_content` as the training
    step; every other message passes on unchanged."""

    def mod(message: Message, context: Context, call_next) -> Message:
        if not is_secure_round(message):
            return call_next(message, context)

        def collect(msg: Message, ctxt: Context) -> Message:
            fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
            config = dict(fitins.config)
            names = str(config.pop(SECAGG_NAMES_KEY)).split("\n")
            max_weight = float(config.pop(SECAGG_MAX_WEIGHT_KEY))
            global_params = dict(zip(names, parameters_to_ndarrays(fitins.parameters)))
            content = RecordDict({
                "arrays": ArrayRecord({n: Array(contiguous(v)) for n, v in global_params.items()}),
                "config": ConfigRecord(config),
            })
            reply = train_content(content, ctxt)
            if isinstance(reply, Error):   # refused (fingerprints, budget): the mod cannot mask an error
                raise SecureRoundRefused(reply.reason)
            return Message(compat.fitres_to_recorddict(masked_change(global_params, reply, names, max_weight), True),
                           reply_to=msg)

        return secaggplus_mod(message, context, collect)

    return mod
