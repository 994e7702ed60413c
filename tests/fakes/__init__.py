"""Loopback fakes of cloud APIs that run the real function entries of backends/ in other processes."""
