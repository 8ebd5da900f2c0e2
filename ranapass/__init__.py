"""ranapass: RaNA adapters as a torch.compile backend.

Calibrate once (``profile``), allocate ranks globally under a FLOP budget (``Profile.plan``),
``attach`` the plan, then ``torch.compile(model, backend=ranapass.rana_backend)``.
"""

from ranapass.adapters import AdapterSpec, NeuronAdapterSpec, RankAdapterSpec, register_adapter
from ranapass.attach import Attachment, FlopMeter, attach, detach
from ranapass.backend import RanaBackend, rana_backend
from ranapass.diff import GraphDiff, diff
from ranapass.fingerprint import weights_fingerprint
from ranapass.fx_pass import RewriteError, RewriteReport
from ranapass.generation import CompiledGenerator
from ranapass.plan import Plan, PlanMismatchError, UnitPlan
from ranapass.profiling import Profile, ProfileOptions, profile

__all__ = [
    "AdapterSpec",
    "Attachment",
    "CompiledGenerator",
    "FlopMeter",
    "GraphDiff",
    "NeuronAdapterSpec",
    "Plan",
    "PlanMismatchError",
    "Profile",
    "ProfileOptions",
    "RanaBackend",
    "RankAdapterSpec",
    "RewriteError",
    "RewriteReport",
    "UnitPlan",
    "attach",
    "detach",
    "diff",
    "profile",
    "rana_backend",
    "register_adapter",
    "weights_fingerprint",
]
