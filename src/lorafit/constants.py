"""Values shared across the pipeline, defined once."""

# The label value torch's cross entropy skips: prompt tokens, padding, each packed example's
# first position.
IGNORE_INDEX = -100

# Attention implementations a model may ask for, and those that keep packed examples apart
# (block-diagonal masks from restarting position ids, or variable-length flash attention).
# flex_attention is refused for packing: it has no CPU backward and ignores position restarts.
# sdpa_packed (lorafit.model.packed_attention) attends each packed example on its own.
ATTENTION_BACKENDS = (
    "sdpa", "sdpa_packed", "eager", "flash_attention_2", "flash_attention_3", "flex_attention",
)  # fmt: skip
ISOLATING_BACKENDS = ("sdpa", "sdpa_packed", "eager", "flash_attention_2", "flash_attention_3")

# Where a checkpoint keeps what its run was (model, adapter shape, data): lorafit.runs.resume.
FINGERPRINT_KEY = "lorafit_fingerprint"
