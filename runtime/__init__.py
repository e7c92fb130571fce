"""safesteer_runtime: the implementation behind ``safesteer_rt``.

Needs onnxruntime, numpy, tokenizers, pillow and jinja2 only; never imports torch or transformers.
Apps import the public names from ``safesteer_rt``; the exporter imports the manifest schema from here.
"""
