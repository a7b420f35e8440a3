"""Evaluation. ``engine.evaluate_pipeline`` is the one evaluation (``ddpm-plus evaluate`` and the trainer call it):
``options`` (what to compute, checked once), ``real_images`` (the data), ``bound`` (bits/dim, from
``likelihood``), ``sample_quality`` and ``sample_metrics`` (FID, KID, precision/recall, FD_DINOv2),
``digits_proxy`` (the digits' Frechet proxy), ``metrics_table`` (labels, tracker keys, model-index entries),
``outputs`` (grid, PNGs, JSON), ``errors``; ``analytic`` and ``analytic_export`` for Analytic-DPM's moments."""
