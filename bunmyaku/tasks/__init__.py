"""Task families: for each, the head, the collator, the metric and the post-processing."""
