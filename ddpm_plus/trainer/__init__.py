"""The accelerate trainer: the loop, its flags, data order, losses, checkpointing, run lock, preemption and
periodic evaluation."""
