"""Streaming recognisers: pocketsphinx (offline default), sensevoice (sherpa-onnx), openai."""
