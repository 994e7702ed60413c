"""The funcpipe test suite."""
