"""The advisor: LoRA rank per module, bit width, compensation rank, memory forecast, exported configs.

It reads ``analysis.json``-shaped data only (no model), so it can be tested on synthetic spectra.
"""

from .recommend import RecommendSettings, recommend, write_recommendation

__all__ = ["RecommendSettings", "recommend", "write_recommendation"]
