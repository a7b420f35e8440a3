"""The DDPM scheduler: float64 schedule/posterior/variance algebra, respacing, and the diffusers adapter."""
