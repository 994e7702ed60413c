"""Tests of funcpipe.platforms: the built-in specs, spec files and validation."""
