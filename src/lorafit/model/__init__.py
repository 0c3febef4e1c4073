"""The model: sources (Hub, random, GGUF) -> quantization -> adapters -> losses -> the
LightningModule, with its schedules, the packing preflight and the shape checks."""
