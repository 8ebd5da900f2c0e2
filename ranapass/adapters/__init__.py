"""Adapter kinds: what a plan stores for one adapted unit, one module per kind (see ``registry``).

Importing the package registers the built-in kinds: ``rank``, ``neuron`` and ``gated_mask`` (the
CATS-style baseline). Specs are data; ``ranapass.bound`` binds them to a model's weights.
"""

from ranapass.adapters.gated_mask import GatedMaskAdapterSpec
from ranapass.adapters.neuron import NeuronAdapterSpec
from ranapass.adapters.rank import RankAdapterSpec
from ranapass.adapters.registry import ADAPTER_KINDS, AdapterSpec, Lowering, register_adapter

__all__ = [
    "ADAPTER_KINDS",
    "AdapterSpec",
    "GatedMaskAdapterSpec",
    "Lowering",
    "NeuronAdapterSpec",
    "RankAdapterSpec",
    "register_adapter",
]
