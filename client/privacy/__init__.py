"""Differential privacy at the site: patient-level DP-SGD, its accountant and ledger, and the privacy config rules."""
from client.privacy.accountant import epsilon_spent, noise_for_target
from client.privacy.clipped_sum import clipped_gradient_sum
from client.privacy.clipping import COUPLED_TERMS, ClipNorms, PrivacyError, require_group_norm
from client.privacy.ledger import BudgetExceeded, PrivacyLedger, PrivacySpend
from client.privacy.sampling import PatientSampler
from client.privacy.settings import validate_privacy_config
from client.privacy.training import DpRoundResult, DpSgdSettings, dp_train_round, dp_train_steps
from client.site import effective_caps

__all__ = [
    "COUPLED_TERMS", "BudgetExceeded", "ClipNorms", "DpRoundResult", "DpSgdSettings", "PatientSampler",
    "PrivacyError", "PrivacyLedger", "PrivacySpend", "clipped_gradient_sum", "dp_train_round", "dp_train_steps",
    "effective_caps", "epsilon_spent", "noise_for_target", "require_group_norm", "validate_privacy_config",
]
