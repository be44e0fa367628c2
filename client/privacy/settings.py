"""The site's check of the `privacy/` config group: its own DP-SGD block, then the federation-wide rules."""
from __future__ import annotations

from client.privacy.clipping import PrivacyError
from client.privacy.training import DpSgdSettings
from shared_models.privacy_config import config_value, privacy_block, validate_federation_privacy


def validate_privacy_config(cfg) -> None:
    """Raise ValueError explaining why the composed config's privacy settings cannot work; None if they can."""
    validate_federation_privacy(cfg)
    if config_value(cfg, "privacy") is None:
        return
    where = f"privacy={config_value(cfg, 'privacy.name', '?')}"
    dpsgd = privacy_block(cfg, "dpsgd")
    if dpsgd is not None:
        try:
            DpSgdSettings.from_config(dpsgd)
        except PrivacyError as error:
            raise ValueError(f"{where}: {error}") from None
        if int(config_value(cfg, "train.grad_accum", 1) or 1) != 1:
            raise ValueError(f"{where}: train.grad_accum must be 1 under DP-SGD "
                             "(one step is one Poisson batch of patients)")
