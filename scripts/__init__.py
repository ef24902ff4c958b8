"""Command-line entry points and training / benchmark scripts of hessdiff."""
