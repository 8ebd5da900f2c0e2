"""ranapass: RaNA adapters as a torch.compile backend.

Calibrate once (``profile``), allocate ranks globally under a FLOP budget (``Profile.plan``),
``attach`` the plan, then ``torch.compile(model, backend=ranapass.rana_backend)``.
"""

from ranapass.adapters import AdapterSpec, NeuronAdapterSpec, RankAdapterSpec, register_adapter
from ranapass.attach import Attachment, FlopMeter, attach, detach
from ranapass.data import calibration_windows, evaluation_windows, load_texts, token_windows
from ranapass.evaluate import PerplexityResult, perplexity
from ranapass.fingerprint import weights_fingerprint
from ranapass.lora import LoraAdapter, LoraCompression, compress_lora, load_lora
from ranapass.models import load_model
from ranapass.plan import Plan, PlanMismatchError, UnitPlan
from ranapass.profiling import Profile, ProfileOptions, profile

__all__ = [
    "AdapterSpec",
    "Attachment",
    "FlopMeter",
    "LoraAdapter",
    "LoraCompression",
    "NeuronAdapterSpec",
    "PerplexityResult",
    "Plan",
    "PlanMismatchError",
    "Profile",
    "ProfileOptions",
    "RankAdapterSpec",
    "UnitPlan",
    "attach",
    "calibration_windows",
    "compress_lora",
    "detach",
    "evaluation_windows",
    "load_lora",
    "load_model",
    "load_texts",
    "perplexity",
    "profile",
    "register_adapter",
    "token_windows",
    "weights_fingerprint",
]
