"""Reporting: comparison tables, statistics, summary, report, model card, plots."""
