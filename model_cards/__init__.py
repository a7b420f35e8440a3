"""Model-card templates (Markdown with string.Template placeholders), installed as ddpm_plus.model_cards."""
