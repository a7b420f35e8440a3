"""Sampling: DDPMPlusPipeline (class conditioning, classifier-free guidance) and the fast sampler."""
