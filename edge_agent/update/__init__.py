"""Model updates on the device: the pure trust core and the update workflow."""
