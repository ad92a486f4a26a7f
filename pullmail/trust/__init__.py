"""Trust checks for General Delivery and push (SPEC 6)."""
