"""Next-token, flow-matching and joint losses (issue #5): not built yet."""
