"""Tests of funcpipe.storage: a shared conformance suite and per-backend specifics."""
