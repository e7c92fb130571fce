"""safesteer_export: Hugging Face checkpoint -> per-layer-block ONNX artifact (uses torch; never imported by the runtime)."""
