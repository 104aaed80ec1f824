"""Voice activity detectors: silero (ONNX, default), webrtcvad, nop."""
