"""Code both sides of Tally import: the wire protocol, the usage model, errors, settings."""
