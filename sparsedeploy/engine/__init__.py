"""The torch-free engine layer: the Runtime interface and its registry, graph IO, the deployment reader,
one module per engine (onnxruntime, deepsparse, native/), the KV-slot decode loop and the worker process.

Rule: nothing here imports torch, transformers, or any sparsedeploy package above it (pipeline, export,
bench, serve, workflows, cli); tests/test_layers.py fails on an upward import.
"""
from .base import Runtime, canonical, engine_class, engine_names, make_runtime, median_call_ms, register, unavailable  # noqa: F401
from .graphio import model_io  # noqa: F401
