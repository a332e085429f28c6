"""The critical batch size of the quality benchmark's model in the one-pass regime (issue 23)."""
