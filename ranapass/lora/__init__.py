"""Post-hoc rank compression of a trained LoRA adapter, with ranks allocated across the whole network.

Read an adapter (:mod:`~ranapass.lora.io`), take each update's spectrum from its factors alone
(:mod:`~ranapass.lora.spectrum`), optionally measure the fine-tuned model on calibration text so that a
truncation is charged its output error or its second-order loss change (:mod:`~ranapass.lora.calibration`),
choose every module's rank for a parameter or FLOP budget with one of the allocation methods
(:mod:`~ranapass.lora.compression`), and write a PEFT adapter with a report (:mod:`~ranapass.lora.report`).

Example::

    result = ranapass.compress_lora("my-adapter", keep=0.25)
    result.adapter.save("my-adapter-25")   # PeftModel.from_pretrained(base, "my-adapter-25")
"""

from ranapass.lora.calibration import LoraCalibration, calibrate_lora
from ranapass.lora.compression import CALIBRATED_ERRORS, ERRORS, METHODS, TARGETS, compress_lora
from ranapass.lora.io import LoraAdapter, LoraFactors, load_lora
from ranapass.lora.report import LoraCompression, ModuleRanks
from ranapass.lora.spectrum import LoraSpectrum, lora_spectrum

__all__ = [
    "CALIBRATED_ERRORS",
    "ERRORS",
    "METHODS",
    "TARGETS",
    "LoraAdapter",
    "LoraCalibration",
    "LoraCompression",
    "LoraFactors",
    "LoraSpectrum",
    "ModuleRanks",
    "calibrate_lora",
    "compress_lora",
    "load_lora",
    "lora_spectrum",
]
