"""Audiences as code: models, rules and the file that declares them (``audiences.yml``)."""
