"""lm-eval task folder of the demo zoo (pass its path as include_path)."""
