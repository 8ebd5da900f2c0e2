"""ranapass: RaNA adapters as a torch.compile backend.

Calibrate once (``profile``), allocate ranks globally under a FLOP budget (``Profile.plan``),
``attach`` the plan, then ``torch.compile(model, backend=ranapass.rana_backend)``.
"""

from ranapass.adapters import AdapterSpec, NeuronAdapterSpec, RankAdapterSpec, register_adapter
from ranapass.attach import Attachment, FlopMeter, attach, detach
from ranapass.fingerprint import weights_fingerprint
from ranapass.lora import LoraAdapter, LoraCompression, compress_lora, load_lora
from ranapass.plan import Plan, PlanMismatchError, UnitPlan
from ranapass.profiling import Profile, ProfileOptions, profile

__all__ = [
    "AdapterSpec",
    "Attachment",
    "FlopMeter",
    "LoraAdapter",
    "LoraCompression",
    "NeuronAdapterSpec",
    "Plan",
    "PlanMismatchError",
    "Profile",
    "ProfileOptions",
    "RankAdapterSpec",
    "UnitPlan",
    "attach",
    "compress_lora",
    "detach",
    "load_lora",
    "profile",
    "register_adapter",
    "weights_fingerprint",
]
