"""The damaged-input corpus, and the scripts that regenerate it (a package, so they import each other by name)."""
