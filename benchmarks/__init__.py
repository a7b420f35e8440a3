"""Side-by-side benchmarks of ddpm_plus against stock diffusers (entry point: benchmarks/run.py)."""
