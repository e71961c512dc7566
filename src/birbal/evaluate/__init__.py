"""Scoring the served model: HELM's open run specs, a quick offline suite, and the report."""
