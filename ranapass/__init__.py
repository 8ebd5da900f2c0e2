"""ranapass: RaNA adapters as a torch.compile backend.

Calibrate once (``profile``), allocate ranks globally under a FLOP budget (``Profile.plan``),
``attach`` the plan, then ``torch.compile(model, backend=ranapass.rana_backend)``.
"""

from ranapass.adapters import AdapterSpec, NeuronAdapterSpec, RankAdapterSpec, register_adapter
from ranapass.attach import Attachment, FlopMeter, attach, detach
from ranapass.fingerprint import weights_fingerprint
from ranapass.plan import Plan, PlanMismatchError, UnitPlan
from ranapass.profiling import Profile, ProfileOptions, profile

__all__ = [
    "AdapterSpec",
    "Attachment",
    "FlopMeter",
    "NeuronAdapterSpec",
    "Plan",
    "PlanMismatchError",
    "Profile",
    "ProfileOptions",
    "RankAdapterSpec",
    "UnitPlan",
    "attach",
    "detach",
    "profile",
    "register_adapter",
    "weights_fingerprint",
]
