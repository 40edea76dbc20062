"""The embedded demo world: a miniature of the paper's experiment, built offline."""
