"""Losses as pure functions: logits with the class axis LAST, integer targets without it."""
