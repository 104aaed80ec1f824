"""Speech synthesisers: flite (offline default), openai."""
