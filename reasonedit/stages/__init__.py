"""The three training stages (issue #5): not built yet."""
