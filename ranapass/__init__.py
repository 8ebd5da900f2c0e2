"""ranapass: RaNA adapters as a torch.compile backend.

Calibrate once (``profile``), allocate ranks globally under a FLOP budget (``Profile.plan``),
``attach`` the plan, then ``torch.compile(model, backend=ranapass.rana_backend)``.
"""

from ranapass.adapters import AdapterSpec, NeuronAdapterSpec, RankAdapterSpec, register_adapter
from ranapass.attach import Attachment, FlopMeter, attach, detach
from ranapass.backend import RanaBackend, rana_backend
from ranapass.data import calibration_windows, evaluation_windows, load_texts, token_windows
from ranapass.diff import GraphDiff, diff
from ranapass.evaluate import AdaptedResult, PerplexityResult, adapted_perplexity, perplexity
from ranapass.fingerprint import weights_fingerprint
from ranapass.fx_pass import RewriteError, RewriteReport
from ranapass.generation import CompiledGenerator
from ranapass.lora import LoraAdapter, LoraCalibration, LoraCompression, calibrate_lora, compress_lora, load_lora
from ranapass.models import load_model
from ranapass.plan import Plan, PlanMismatchError, UnitPlan
from ranapass.planning import PlanOptions
from ranapass.profiling import Profile, ProfileOptions, profile

__all__ = [
    "AdaptedResult",
    "AdapterSpec",
    "Attachment",
    "CompiledGenerator",
    "FlopMeter",
    "GraphDiff",
    "LoraAdapter",
    "LoraCalibration",
    "LoraCompression",
    "NeuronAdapterSpec",
    "PerplexityResult",
    "Plan",
    "PlanMismatchError",
    "PlanOptions",
    "Profile",
    "ProfileOptions",
    "RanaBackend",
    "RankAdapterSpec",
    "RewriteError",
    "RewriteReport",
    "UnitPlan",
    "adapted_perplexity",
    "attach",
    "calibrate_lora",
    "calibration_windows",
    "compress_lora",
    "detach",
    "diff",
    "evaluation_windows",
    "load_lora",
    "load_model",
    "load_texts",
    "perplexity",
    "profile",
    "rana_backend",
    "register_adapter",
    "token_windows",
    "weights_fingerprint",
]
