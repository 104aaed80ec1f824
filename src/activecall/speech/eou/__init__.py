"""End-of-turn detection (semantic endpointing): Smart Turn v3 and the turn decision, docs/speech.md."""
