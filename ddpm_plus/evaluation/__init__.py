"""Evaluation: the exact bound (bits/dim), sample metrics (FID, KID, precision/recall, FD_DINOv2), real-image
loading, the digits proxy, and Analytic-DPM's moment estimation."""
