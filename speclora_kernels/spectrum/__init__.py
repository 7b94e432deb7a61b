"""Spectral analysis of fine-tuning: which singular directions of each weight moved, by how
much, and how many of them (k) an adapter needs to reproduce the change.

    python -m speclora_kernels.spectrum BASE FINETUNED --out DIR [--top N] [--k K]
        [--share 0.9] [--suggest] [--targets REGEX]

- :mod:`.analysis`: the float64 math of one layer (singular value ratios, singular vector
  cosines, the energy shares of dW, the suggested k), all defined there;
- :mod:`.load`: safetensors weights, and the exact dW of an adapter directory (ours or PEFT's)
  through the library's own loaders;
- :mod:`.report`: a whole model, its JSON, console table and ``--suggest`` text;
- :mod:`.plot`: the PNG figures (matplotlib, imported on use).
"""
from .analysis import MEASURES, energy_curves, layer_spectrum, suggested_k
from .report import SCHEMA, SCHEMA_VERSION, analyse, format_suggestion, format_table, write_json

__all__ = ["analyse", "layer_spectrum", "energy_curves", "suggested_k", "format_table",
           "format_suggestion", "write_json", "MEASURES", "SCHEMA", "SCHEMA_VERSION"]
