"""fine_tune: fine-tune Hugging Face models with one Accelerate-driven loop, from a laptop CPU to DeepSpeed nodes."""

__version__ = "0.1.0"

# Exit status of a run that stopped on a signal after saving a checkpoint: "please requeue me".
# 75 is EX_TEMPFAIL from sysexits.h (a temporary failure; retrying may succeed).
EXIT_CHECKPOINTED = 75
